// keygate's OAuth2 server and gateway, driven by npm clients that other people wrote: oauth4webapi
// (an OAuth 2 client: RFC 8414 discovery, client credentials and refresh with DPoP, RFC 7662
// introspection, RFC 7009 revocation, protected-resource requests, and an RFC 9068 + RFC 9449
// resource-server validation of keygate's tokens) and dpop (RFC 9449 proofs and RFC 7638
// thumbprints). A DPoP-bound token goes through the gateway end to end, then every way a proof
// can be wrong: replayed, for another method, for another URL, by another key, for another token,
// and the bound token sent as Bearer. Every check prints one line; the run ends with
// "node: N passed, N failed" and exits 1 on any failure. A failed check stops the rest of its
// section, never the other sections.
//
// Run by scripts/interop-test, which starts keygate and the echo upstream and sets
// KEYGATE_ADMIN_URL, KEYGATE_GATEWAY_URL, KEYGATE_ISSUER, KEYGATE_ROOT_KEY and INTEROP_RESULTS
// (see test_python_clients.py). Node 20 or newer (WebCrypto Ed25519 and P-256).

import fs from 'node:fs';
import * as DPoP from 'dpop';
import * as oauth from 'oauth4webapi';

const env = (name) => {
  const v = process.env[name];
  if (!v) {
    console.error(`${name} is not set; run this through scripts/interop-test`);
    process.exit(2);
  }
  return v.replace(/\/+$/, '');
};
const ADMIN = env('KEYGATE_ADMIN_URL');
const GATEWAY = env('KEYGATE_GATEWAY_URL');
const ISSUER = env('KEYGATE_ISSUER');
const ROOT_KEY = env('KEYGATE_ROOT_KEY');
const SCOPE = 'orders:read';
const ORDERS = `${GATEWAY}/orders/1`;
// oauth4webapi talks HTTPS only unless told otherwise; the test runs on loopback.
const insecure = { [oauth.allowInsecureRequests]: true };

// ---------------------------------------------------------------------------------------------
// The check runner

class Failure extends Error {}
let passed = 0;
let failed = 0;

function expect(cond, name, detail = '') {
  if (!cond) throw new Failure(detail ? `${name}\n         ${detail}` : name);
  passed += 1;
  console.log(`  ok    ${name}`);
}

async function section(title, fn) {
  console.log(`-- ${title}`);
  try {
    await fn();
  } catch (e) {
    failed += 1;
    if (e instanceof Failure) console.log(`  FAIL  ${e.message}`);
    else console.log(`  FAIL  ${title}: ${e?.name}: ${e?.message}${e?.cause ? `\n         cause: ${JSON.stringify(e.cause).slice(0, 400)}` : ''}\n${e?.stack?.split('\n').slice(1, 5).join('\n')}`);
  }
}

// ---------------------------------------------------------------------------------------------
// Helpers

async function admin(method, path, body) {
  const r = await fetch(`${ADMIN}${path}`, {
    method,
    headers: { authorization: `Bearer ${ROOT_KEY}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await r.text();
  if (r.status >= 300) throw new Failure(`setup: admin API ${method} ${path} answered ${r.status} ${text.slice(0, 300)}`);
  return JSON.parse(text);
}

/** An app with an OAuth client (one client per app). */
async function newClient(label, authMethod, grantTypes = ['client_credentials']) {
  const app = await admin('POST', '/admin/v1/apps', { name: `interop node ${label} ${Math.random().toString(36).slice(2, 8)}` });
  const c = await admin('POST', `/admin/v1/apps/${app.id}/oauth-client`, {
    grant_types: grantTypes,
    scopes: [SCOPE],
    token_endpoint_auth_method: authMethod,
  });
  return { ...c, app_id: app.id };
}

const claimsOf = (jwt) => JSON.parse(Buffer.from(jwt.split('.')[1], 'base64url').toString());
const headerOf = (jwt) => JSON.parse(Buffer.from(jwt.split('.')[0], 'base64url').toString());

/**
 * A protected-resource request through oauth4webapi. `opts.handle`: an oauth4webapi DPoP handle
 * that makes the proof; `opts.proof`: a proof made elsewhere, sent as the DPoP header (oauth4webapi
 * then sends Authorization: DPoP); neither: Authorization: Bearer. Returns {status, body} or, for
 * a refusal with a WWW-Authenticate challenge, {status, challenges} as oauth4webapi parsed them.
 */
async function resource(token, { handle, proof, method = 'GET', url = ORDERS, capture } = {}) {
  const headers = new Headers();
  if (proof) headers.set('dpop', proof);
  const options = { ...insecure };
  if (handle) options.DPoP = handle;
  if (capture) {
    options[oauth.customFetch] = (u, init) => {
      capture.url = u;
      capture.init = init;
      return fetch(u, init);
    };
  }
  try {
    const r = await oauth.protectedResourceRequest(token, method, new URL(url), headers, null, options);
    const text = await r.text();
    let body;
    try {
      body = JSON.parse(text);
    } catch {
      body = text;
    }
    return { status: r.status, body };
  } catch (e) {
    if (e instanceof oauth.WWWAuthenticateChallengeError) {
      return { status: e.status, challenges: e.cause };
    }
    throw e;
  }
}

const describe = (r) => JSON.stringify(r).slice(0, 400);

/** A 401 whose DPoP challenge (RFC 9449 §7.1) names `error`. */
function refusedWith(r, error) {
  return r.status === 401 && (r.challenges || []).some((c) => c.scheme === 'dpop' && c.parameters?.error === error);
}

async function ath(token) {
  return Buffer.from(await crypto.subtle.digest('SHA-256', new TextEncoder().encode(token))).toString('base64url');
}

// ---------------------------------------------------------------------------------------------

let as;

await section('discovery with oauth4webapi (RFC 8414, on the gateway port)', async () => {
  const issuer = new URL(ISSUER);
  const response = await oauth.discoveryRequest(issuer, { algorithm: 'oauth2', ...insecure });
  expect(response.url === `${ISSUER}/.well-known/oauth-authorization-server`,
    'discoveryRequest fetched <issuer>/.well-known/oauth-authorization-server', response.url);
  as = await oauth.processDiscoveryResponse(issuer, response);
  expect(as.issuer === ISSUER, 'processDiscoveryResponse accepts it: issuer matches', as.issuer);
  for (const [name, path] of [
    ['token_endpoint', '/oauth2/token'],
    ['introspection_endpoint', '/oauth2/introspect'],
    ['revocation_endpoint', '/oauth2/revoke'],
    ['jwks_uri', '/.well-known/jwks.json'],
  ]) {
    expect(as[name] === `${ISSUER}${path}`, `metadata ${name} = issuer + ${path}`, as[name]);
  }
  for (const alg of ['ES256', 'EdDSA']) {
    expect((as.dpop_signing_alg_values_supported || []).includes(alg), `metadata dpop_signing_alg_values_supported has ${alg}`,
      JSON.stringify(as.dpop_signing_alg_values_supported));
  }
});

// Both libraries name Ed25519 proofs "Ed25519" (RFC 9864's fully-specified name); keygate accepts it
// as well as "EdDSA", so both runs use the libraries as they come, with no hook.
for (const alg of ['ES256', 'Ed25519']) {
  const title = alg === 'ES256'
    ? 'DPoP end to end with an ES256 key: oauth4webapi client, dpop package proofs, keygate gateway'
    : 'DPoP end to end with an Ed25519 key: oauth4webapi client, dpop package proofs (alg Ed25519), keygate gateway';
  await section(title, async () => {
    if (!as) throw new Failure('needs the discovered metadata');
    const c = await newClient(`dpop-${alg}`, 'client_secret_basic');
    const client = { client_id: c.client_id };
    const clientAuth = oauth.ClientSecretBasic(c.client_secret);
    const keyPair = await DPoP.generateKeyPair(alg);
    const handle = oauth.DPoP(client, keyPair);

    const tokenResponse = await oauth.clientCredentialsGrantRequest(as, client, clientAuth, { scope: SCOPE }, { DPoP: handle, ...insecure });
    const tok = await oauth.processClientCredentialsResponse(as, client, tokenResponse);
    expect(tok.token_type === 'dpop', 'client credentials with a DPoP proof: processClientCredentialsResponse gives token_type DPoP', tok.token_type);
    expect(tok.expires_in === 900 && tok.scope === SCOPE, 'token answer: expires_in 900, scope orders:read', `${tok.expires_in} ${tok.scope}`);
    const at = tok.access_token;
    const claims = claimsOf(at);
    const jktDpop = await DPoP.calculateThumbprint(keyPair.publicKey);
    const jktOauth = await handle.calculateThumbprint();
    expect(jktDpop === jktOauth, "dpop's and oauth4webapi's RFC 7638 thumbprints of the key agree", `${jktDpop} ${jktOauth}`);
    expect(claims.cnf?.jkt === jktDpop, "the token's cnf.jkt is the thumbprint of the DPoP key", `${JSON.stringify(claims.cnf)} vs ${jktDpop}`);
    expect(headerOf(at).typ === 'at+jwt' && claims.client_id === c.client_id && claims.iss === ISSUER,
      'the token: typ at+jwt, client_id the client, iss the issuer', JSON.stringify(headerOf(at)));

    // The resource request as oauth4webapi makes it (it adds the proof, with ath).
    const sent = {};
    let r = await resource(at, { handle, capture: sent });
    expect(r.status === 200, 'protectedResourceRequest GET /orders/1 with the DPoP handle: 200', describe(r));
    expect(r.body?.headers?.['x-keygate-scopes'] === SCOPE && r.body?.headers?.['x-keygate-app-id'] === c.app_id,
      'the upstream got the request with x-keygate-scopes orders:read and the app id', describe(r.body));
    expect(r.body?.headers?.authorization === undefined, 'the upstream does not see the token', describe(r.body?.headers));
    const sentHeaders = sent.init?.headers || {};
    expect(sentHeaders.authorization === `DPoP ${at}` && typeof sentHeaders.dpop === 'string',
      'oauth4webapi sent Authorization: DPoP <token> and a DPoP header', Object.keys(sentHeaders).join(','));
    const proofClaims = claimsOf(sentHeaders.dpop);
    expect(proofClaims.htm === 'GET' && proofClaims.htu === ORDERS && proofClaims.ath === (await ath(at)),
      "its proof: htm GET, htu the gateway URL, ath = the token's hash", JSON.stringify(proofClaims));

    // RFC 9449 §4.3: htu leaves out the query; oauth4webapi sends none in its proofs.
    r = await resource(at, { handle, url: `${ORDERS}?expand=items&page=2` });
    expect(r.status === 200 && r.body?.path === '/orders/1?expand=items&page=2',
      'a request with a query string (proof htu without it, as RFC 9449 §4.3 says): 200, the query reaches the upstream', describe(r));

    // The same proof again.
    r = await resource(at, { proof: sentHeaders.dpop });
    expect(refusedWith(r, 'invalid_dpop_proof'), 'the same proof replayed: 401, DPoP challenge error invalid_dpop_proof', describe(r));

    // Proofs made with the dpop package: a good one, then one thing wrong at a time.
    const makeProof = (kp, htm, htu, token) => DPoP.generateProof(kp, htu, htm, undefined, token);
    const good = () => makeProof(keyPair, 'GET', ORDERS, at);
    r = await resource(at, { proof: await good() });
    expect(r.status === 200, 'control: a fresh proof from the dpop package: 200', describe(r));
    r = await resource(at, { proof: await makeProof(keyPair, 'POST', ORDERS, at) });
    expect(refusedWith(r, 'invalid_dpop_proof'), 'a proof for POST on a GET request: 401 invalid_dpop_proof', describe(r));
    r = await resource(at, { method: 'DELETE', proof: await good() });
    expect(refusedWith(r, 'invalid_dpop_proof'), 'a proof for GET on a DELETE request: 401 invalid_dpop_proof', describe(r));
    r = await resource(at, { proof: await makeProof(keyPair, 'GET', `${GATEWAY}/orders/2`, at) });
    expect(refusedWith(r, 'invalid_dpop_proof'), 'a proof for /orders/2 on /orders/1: 401 invalid_dpop_proof', describe(r));
    const otherHost = ORDERS.replace('127.0.0.1', 'localhost');
    r = await resource(at, { proof: await makeProof(keyPair, 'GET', otherHost, at) });
    expect(refusedWith(r, 'invalid_dpop_proof'), 'a proof for another host (localhost) on 127.0.0.1: 401 invalid_dpop_proof', describe(r));
    const otherKey = await DPoP.generateKeyPair(alg);
    r = await resource(at, { proof: await makeProof(otherKey, 'GET', ORDERS, at) });
    expect(r.status === 401 && r.challenges?.some((x) => x.scheme === 'dpop'), 'a proof by another key: 401 with a DPoP challenge', describe(r));
    r = await resource(at, { proof: await makeProof(keyPair, 'GET', ORDERS, `${at}x`) });
    expect(refusedWith(r, 'invalid_dpop_proof'), 'a proof whose ath is for another token: 401 invalid_dpop_proof', describe(r));
    r = await resource(at, { proof: await makeProof(keyPair, 'GET', ORDERS, undefined) });
    expect(refusedWith(r, 'invalid_dpop_proof'), 'a proof without ath: 401 invalid_dpop_proof', describe(r));
    r = await resource(at);
    expect(r.status === 401 && r.challenges?.some((x) => x.scheme === 'dpop' && x.parameters?.error === 'invalid_token'),
      'the bound token as Authorization: Bearer (no proof): 401, DPoP challenge error invalid_token', describe(r));
    const raw = await fetch(ORDERS, { headers: { authorization: `Bearer ${at}`, dpop: await good() } });
    expect(raw.status === 401, 'the bound token as Bearer even with a valid proof beside it: 401', `${raw.status}`);

    // oauth4webapi as a resource server: RFC 9068 checks of the token and RFC 9449 checks of a proof.
    const request = new Request(ORDERS, { headers: { authorization: `DPoP ${at}`, dpop: await good() } });
    const validated = await oauth.validateJwtAccessToken(as, request, ISSUER, insecure);
    expect(validated.client_id === c.client_id && validated.scope === SCOPE && validated.cnf?.jkt === jktDpop,
      "oauth4webapi's validateJwtAccessToken accepts the token (JWKS signature, typ, iss, aud, exp) and a proof for it",
      JSON.stringify(validated));

    // Introspection and revocation through oauth4webapi.
    let info = await oauth.processIntrospectionResponse(as, client, await oauth.introspectionRequest(as, client, clientAuth, at, insecure));
    expect(info.active === true && info.token_type === 'DPoP' && info.cnf?.jkt === jktDpop && info.client_id === c.client_id,
      'introspection: active, token_type DPoP, cnf.jkt the key, client_id the client', JSON.stringify(info));
    const revocation = await oauth.revocationRequest(as, client, clientAuth, at, insecure);
    expect(revocation.status === 200, 'revocationRequest: 200', `${revocation.status}`);
    await oauth.processRevocationResponse(revocation); // throws on an error answer
    r = await resource(at, { proof: await good() });
    expect(r.status === 401, 'the very next request with a fresh, valid proof after revocation: 401', describe(r));
    info = await oauth.processIntrospectionResponse(as, client, await oauth.introspectionRequest(as, client, clientAuth, at, insecure));
    expect(JSON.stringify(info) === '{"active":false}', 'introspection after revocation: exactly {"active":false}', JSON.stringify(info));
  });
}

await section('DPoP-bound refresh with oauth4webapi (client_secret_post)', async () => {
  if (!as) throw new Failure('needs the discovered metadata');
  const c = await newClient('dpop-refresh', 'client_secret_post', ['client_credentials', 'refresh_token']);
  const client = { client_id: c.client_id };
  const clientAuth = oauth.ClientSecretPost(c.client_secret);
  const keyPair = await DPoP.generateKeyPair('ES256');
  const handle = oauth.DPoP(client, keyPair);
  const jkt = await handle.calculateThumbprint();
  const t1 = await oauth.processClientCredentialsResponse(as, client,
    await oauth.clientCredentialsGrantRequest(as, client, clientAuth, { scope: SCOPE }, { DPoP: handle, ...insecure }));
  expect(t1.token_type === 'dpop' && typeof t1.refresh_token === 'string', 'client credentials: a DPoP token and a refresh token', t1.token_type);
  // A different key cannot use the bound refresh token.
  const thief = oauth.DPoP(client, await DPoP.generateKeyPair('ES256'));
  let error;
  try {
    await oauth.processRefreshTokenResponse(as, client,
      await oauth.refreshTokenGrantRequest(as, client, clientAuth, t1.refresh_token, { DPoP: thief, ...insecure }));
  } catch (e) {
    error = e;
  }
  expect(error instanceof oauth.ResponseBodyError && error.status === 400 && error.error === 'invalid_dpop_proof',
    "refresh with another key's proof: 400 invalid_dpop_proof", `${error?.name} ${error?.status} ${error?.error}`);
  const t2 = await oauth.processRefreshTokenResponse(as, client,
    await oauth.refreshTokenGrantRequest(as, client, clientAuth, t1.refresh_token, { DPoP: handle, ...insecure }));
  expect(t2.token_type === 'dpop' && claimsOf(t2.access_token).cnf?.jkt === jkt && t2.refresh_token !== t1.refresh_token,
    'refresh with the bound key: a DPoP token bound to the same key, and a rotated refresh token', t2.token_type);
  const r = await resource(t2.access_token, { handle });
  expect(r.status === 200, 'the refreshed token with a proof from the handle at the gateway: 200', describe(r));
});

await section('private_key_jwt (RFC 7523) with oauth4webapi, ES256', async () => {
  if (!as) throw new Failure('needs the discovered metadata');
  const keyPair = await crypto.subtle.generateKey({ name: 'ECDSA', namedCurve: 'P-256' }, true, ['sign', 'verify']);
  const jwk = await crypto.subtle.exportKey('jwk', keyPair.publicKey);
  const app = await admin('POST', '/admin/v1/apps', { name: `interop node pkjwt ${Math.random().toString(36).slice(2, 8)}` });
  const c = await admin('POST', `/admin/v1/apps/${app.id}/oauth-client`, {
    grant_types: ['client_credentials'],
    scopes: [SCOPE],
    token_endpoint_auth_method: 'private_key_jwt',
    jwks: { keys: [{ kty: jwk.kty, crv: jwk.crv, x: jwk.x, y: jwk.y }] },
  });
  const client = { client_id: c.client_id };
  const tok = await oauth.processClientCredentialsResponse(as, client,
    await oauth.clientCredentialsGrantRequest(as, client, oauth.PrivateKeyJwt(keyPair.privateKey), { scope: SCOPE }, insecure));
  expect(tok.token_type === 'bearer' && claimsOf(tok.access_token).client_id === c.client_id,
    "oauth4webapi's PrivateKeyJwt assertion gets a Bearer token for the client", tok.token_type);
  const r = await resource(tok.access_token);
  expect(r.status === 200, 'the token works at the gateway', describe(r));
});

await section('token exchange (RFC 8693) with oauth4webapi: a down-scoped, short-lived token', async () => {
  if (!as) throw new Failure('needs the discovered metadata');
  const app = await admin('POST', '/admin/v1/apps', { name: `interop node exchange ${Math.random().toString(36).slice(2, 8)}` });
  const c = await admin('POST', `/admin/v1/apps/${app.id}/oauth-client`, {
    grant_types: ['client_credentials', 'urn:ietf:params:oauth:grant-type:token-exchange'],
    scopes: ['orders:read', 'orders:write'],
    token_endpoint_auth_method: 'client_secret_basic',
  });
  const client = { client_id: c.client_id };
  const auth = oauth.ClientSecretBasic(c.client_secret);
  const broad = await oauth.processClientCredentialsResponse(as, client,
    await oauth.clientCredentialsGrantRequest(as, client, auth, {}, insecure));
  expect(broad.scope.split(' ').sort().join(' ') === 'orders:read orders:write', 'the broad token has orders:read and orders:write', broad.scope);
  const response = await oauth.genericTokenEndpointRequest(as, client, auth, 'urn:ietf:params:oauth:grant-type:token-exchange', {
    subject_token: broad.access_token,
    subject_token_type: 'urn:ietf:params:oauth:token-type:access_token',
    scope: 'orders:read',
  }, insecure);
  const narrow = await oauth.processGenericTokenEndpointResponse(as, client, response);
  expect(narrow.issued_token_type === 'urn:ietf:params:oauth:token-type:access_token' && narrow.scope === 'orders:read',
    'the exchange answers issued_token_type access_token with scope orders:read', JSON.stringify({ ...narrow, access_token: '…' }));
  expect(narrow.expires_in > 0 && narrow.expires_in <= 300, 'the exchanged token lives at most 300 s', `${narrow.expires_in}`);
  const r = await resource(narrow.access_token);
  expect(r.status === 200 && r.body?.headers?.['x-keygate-scopes'] === 'orders:read',
    'the exchanged token works at the gateway with scope orders:read only', describe(r));
  const refused = async (subject, scope) => {
    try {
      await oauth.processGenericTokenEndpointResponse(as, client, await oauth.genericTokenEndpointRequest(as, client, auth,
        'urn:ietf:params:oauth:grant-type:token-exchange', {
          subject_token: subject,
          subject_token_type: 'urn:ietf:params:oauth:token-type:access_token',
          scope,
        }, insecure));
    } catch (e) {
      return e;
    }
    return undefined;
  };
  let error = await refused(broad.access_token, 'admin:all');
  expect(error instanceof oauth.ResponseBodyError && error.error === 'invalid_scope',
    'exchanging the broad token for a scope neither it nor the client holds: invalid_scope', `${error?.name} ${error?.error}`);
  error = await refused(narrow.access_token, 'orders:write');
  expect(error instanceof oauth.ResponseBodyError && error.error === 'invalid_grant',
    'exchanging the exchanged token again (for a broader scope): invalid_grant', `${error?.name} ${error?.error}`);
});

console.log(`node: ${passed} passed, ${failed} failed`);
if (process.env.INTEROP_RESULTS) fs.appendFileSync(process.env.INTEROP_RESULTS, `node ${passed} ${failed}\n`);
process.exit(failed || passed === 0 ? 1 : 0);

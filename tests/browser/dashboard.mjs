// End-to-end test of keygate's web dashboard in a real browser: Debian's chromium driven by
// playwright-core. Starts `$KEYGATE_BIN serve` on free loopback ports with a fresh data directory,
// then walks the dashboard as people would: first-run setup, two-factor enrolment and sign-in,
// apps, tokens (create, call the gateway, usage chart, rotate, revoke), the audit log and its
// exports, members and roles, and the CSRF check. The steps run in order; the first failure stops
// the run with a message, a screenshot and a non-zero exit.
//
//   KEYGATE_BIN=target/debug/keygate node tests/browser/dashboard.mjs
//
// Environment: KEYGATE_BIN (required), CHROMIUM (default /usr/bin/chromium), HEADED=1 to watch.
// Artifacts: target/browser-artifacts/ (full-page screenshots, keygate's stderr, failure shot).

import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const ARTIFACTS = path.join(ROOT, 'target', 'browser-artifacts');
const DOCS_SHOT = path.join(ROOT, 'docs', 'screenshots', 'dashboard.png');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const TIMEOUT = 20_000; // per action or navigation; pages are server-rendered and fast
const START_TIMEOUT = 60_000; // keygate's start (a debug build, migrations on a new database)

const OWNER = { name: 'Olivia Owner', email: 'olivia@example.com', password: 'correct horse battery staple' };
const VIEWER = { name: 'Vera Viewer', email: 'vera@example.com', password: 'viewer password 123' };
const DEV_A = { name: 'Dana Developer', email: 'dana@example.com', password: 'developer A password' };
const DEV_B = { name: 'Ben Builder', email: 'ben@example.com', password: 'developer B password' };

// ---------------------------------------------------------------------------------------------
// Small helpers

class TestFailure extends Error {}

function fail(message) {
  throw new TestFailure(message);
}

function check(condition, message) {
  if (!condition) fail(message);
}

let stepNo = 0;
async function step(name, fn) {
  stepNo += 1;
  const started = Date.now();
  process.stdout.write(`[${String(stepNo).padStart(2, '0')}] ${name} ... `);
  try {
    const result = await fn();
    process.stdout.write(`ok (${Date.now() - started} ms)\n`);
    return result;
  } catch (e) {
    process.stdout.write('FAILED\n');
    e.step = `[${stepNo}] ${name}`;
    throw e;
  }
}

// RFC 4648 base32 (no padding needed, case-insensitive, spaces ignored).
function base32Decode(text) {
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZ234567';
  const clean = text.toUpperCase().replace(/[\s=-]/g, '');
  let bits = 0;
  let value = 0;
  const out = [];
  for (const ch of clean) {
    const v = alphabet.indexOf(ch);
    if (v < 0) fail(`the TOTP secret ${JSON.stringify(text)} is not base32 (bad character ${JSON.stringify(ch)})`);
    value = (value << 5) | v;
    bits += 5;
    if (bits >= 8) {
      out.push((value >>> (bits - 8)) & 0xff);
      bits -= 8;
    }
  }
  return Buffer.from(out);
}

// RFC 4226 HOTP with HMAC-SHA1, 6 digits.
function hotp(key, counter) {
  const msg = Buffer.alloc(8);
  msg.writeBigUInt64BE(BigInt(counter));
  const h = createHmac('sha1', key).update(msg).digest();
  const offset = h[h.length - 1] & 0x0f;
  const bin = h.readUInt32BE(offset) & 0x7fffffff;
  return String(bin % 1_000_000).padStart(6, '0');
}

// RFC 6238 TOTP, 30 s steps. keygate accepts each step once and one step of drift either side,
// so a second code within the same step is the next step's code.
class Totp {
  constructor(secretBase32) {
    this.key = base32Decode(secretBase32);
    this.lastStep = -1;
  }
  next() {
    const now = Math.floor(Date.now() / 1000 / 30);
    const stepToUse = Math.max(now, this.lastStep + 1);
    check(stepToUse <= now + 1, 'test bug: more than two TOTP codes asked for within one 30-s step');
    this.lastStep = stepToUse;
    return hotp(this.key, stepToUse);
  }
}

// Self-check of the TOTP code against RFC 6238's SHA-1 vectors (secret "12345678901234567890").
{
  const key = Buffer.from('12345678901234567890');
  const vectors = [[59, '287082'], [1111111109, '081804'], [1234567890, '005924'], [2000000000, '279037']];
  for (const [t, want] of vectors) {
    const got = hotp(key, Math.floor(t / 30));
    if (got !== want) throw new Error(`TOTP self-check failed at T=${t}: ${got} != ${want}`);
  }
  const b32 = base32Decode('GEZDGNBVGY3TQOJQGEZDGNBVGY3TQOJQ');
  if (!b32.equals(key)) throw new Error('base32 self-check failed');
}

// ---------------------------------------------------------------------------------------------
// keygate

async function startKeygate(tmp) {
  const bin = process.env.KEYGATE_BIN;
  check(bin, 'KEYGATE_BIN is not set (the path of the keygate binary, e.g. target/debug/keygate)');
  const binPath = path.resolve(bin);
  check(fs.existsSync(binPath), `KEYGATE_BIN=${bin}: no such file`);
  const configPath = path.join(tmp, 'keygate.toml');
  fs.writeFileSync(
    configPath,
    [
      `data_dir = ${JSON.stringify(path.join(tmp, 'data'))}`,
      'usage_flush_seconds = 1',
      '[admin]',
      'listen = "127.0.0.1:0"',
      '[gateway]',
      'listen = "127.0.0.1:0"',
      '[log]',
      'level = "warn"',
      '',
    ].join('\n'),
  );
  const logPath = path.join(ARTIFACTS, 'keygate.log');
  const log = fs.createWriteStream(logPath);
  const child = spawn(binPath, ['serve', '--config', configPath], {
    cwd: tmp,
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, NO_COLOR: '1' },
  });
  child.stdout.pipe(log, { end: false });
  const found = {};
  const lines = [];
  const names = { admin: '"admin API on"', gateway: '"gateway on"', setupCode: '"dashboard setup code:"' };
  const ready = new Promise((resolve, reject) => {
    let timer;
    const timeout = (ms) => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        const missing = Object.keys(names).filter((k) => !found[k]).map((k) => names[k]);
        reject(
          new TestFailure(
            `keygate did not print its ${missing.join(', ')} line(s) within ${ms / 1000} s ` +
              `(expected "keygate: admin API on http://ADDR/admin/v1 …", "keygate: gateway on http://ADDR …" and ` +
              `"keygate: dashboard setup code: XXXXX-XXXXX-XXXXX-XXXXX (open http://ADDR/setup)"). stderr so far:\n` +
              lines.slice(-30).join('\n'),
          ),
        );
      }, ms);
    };
    timeout(START_TIMEOUT);
    let listening = false;
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      reject(new TestFailure(`keygate exited during start (code ${code}, signal ${signal}). stderr:\n${lines.join('\n')}`));
    });
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(new TestFailure(`cannot run ${binPath}: ${e.message}`));
    });
    const rl = readline.createInterface({ input: child.stderr });
    rl.on('line', (line) => {
      log.write(`${line}\n`);
      lines.push(line);
      let m;
      if ((m = line.match(/keygate: admin API on (http:\/\/[^/\s]+)\/admin\/v1/))) found.admin = m[1];
      if ((m = line.match(/keygate: gateway on (http:\/\/[^\s/]+)/))) found.gateway = m[1];
      if ((m = line.match(/keygate: dashboard setup code: ([A-Za-z0-9]{5}(?:-[A-Za-z0-9]{5}){3})\b/))) {
        found.setupCode = m[1];
        const u = line.match(/open (http:\/\/[^\s/)]+)\/setup/);
        if (u) found.dashboard = u[1];
      }
      if (found.admin && found.gateway && !listening) {
        // Both listeners are up; the setup code line comes with them or not at all.
        listening = true;
        if (!found.setupCode) timeout(10_000);
      }
      if (found.admin && found.gateway && found.setupCode) {
        clearTimeout(timer);
        resolve();
      }
    });
  });
  ready.catch(() => {}); // handled by the await below; avoids an unhandled rejection on later exit
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 40_000);
    await exited;
    clearTimeout(timer);
    log.end();
  };
  try {
    await ready;
  } catch (e) {
    await stop();
    throw e;
  }
  child.removeAllListeners('exit');
  return { child, stop, admin: found.admin, gateway: found.gateway, setupCode: found.setupCode, dashboard: found.dashboard || found.admin };
}

// ---------------------------------------------------------------------------------------------
// Browser helpers

let base; // the dashboard's origin, e.g. http://127.0.0.1:34567
let gatewayBase;
let currentPage; // the page shown in the failure screenshot
const shots = {};
const lastSubmit = new WeakMap(); // page -> the last form request's method, path, status, headers

const url = (p) => new URL(p, base).toString();
const pathOf = (page) => new URL(page.url()).pathname;

async function newSession(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, acceptDownloads: true });
  context.setDefaultTimeout(TIMEOUT);
  context.setDefaultNavigationTimeout(TIMEOUT);
  const page = await context.newPage();
  // Destructive forms ask window.confirm() through app.js; a person says yes.
  page.on('dialog', (dialog) => dialog.accept().catch(() => {}));
  currentPage = page;
  return { context, page };
}

function submitted(page) {
  const s = lastSubmit.get(page);
  if (!s || s.status < 400) return '';
  return (
    `\n    the form's ${s.method} ${s.path} answered ${s.status}; the browser sent ` +
    `Origin: ${s.origin === undefined ? '(none)' : s.origin}, Sec-Fetch-Site: ${s.fetchSite === undefined ? '(none)' : s.fetchSite}`
  );
}

// What the page says, for failure messages: URL, h1 and any notice.
async function describe(page) {
  try {
    const h1 = await page.locator('h1').first().textContent({ timeout: 1000 }).catch(() => null);
    const notices = await page.locator('.notice, [role=alert], [role=status]').allTextContents().catch(() => []);
    const body = (await page.locator('main').first().innerText({ timeout: 1000 }).catch(() => '')) || '';
    return (
      `\n    at ${page.url()}` +
      `\n    h1: ${JSON.stringify(h1 && h1.trim())}` +
      (notices.length ? `\n    notices: ${JSON.stringify(notices.map((n) => n.trim()))}` : '') +
      `\n    page text: ${JSON.stringify(body.replace(/\s+/g, ' ').slice(0, 400))}` +
      submitted(page)
    );
  } catch {
    return `\n    at ${page.url()}`;
  }
}

async function goto(page, p, { expectStatus = 200 } = {}) {
  const resp = await page.goto(url(p));
  const status = resp ? resp.status() : 0;
  if (expectStatus !== null && status !== expectStatus) {
    fail(`GET ${p} answered ${status}, expected ${expectStatus}${await describe(page)}`);
  }
  return resp;
}

// Clicks a submit button or link and waits until the browser has loaded the next document (the
// target of a POST-redirect-GET, or a re-rendered form).
async function clickAndLoad(page, locator, what) {
  await mustExist(page, locator, what);
  const navigated = page.waitForEvent('framenavigated', { predicate: (f) => f === page.mainFrame(), timeout: TIMEOUT });
  navigated.catch(() => {});
  // Remember the form's request (the first document request after the click), for messages.
  let request = null;
  const onRequest = (r) => {
    if (!request && r.isNavigationRequest() && r.frame() === page.mainFrame()) request = r;
  };
  page.on('request', onRequest);
  try {
    await locator.click();
    try {
      await navigated;
    } catch {
      fail(`clicking ${what} did not load a new page within ${TIMEOUT / 1000} s (form validation?)${await describe(page)}`);
    }
    await page.waitForLoadState('load');
  } finally {
    page.off('request', onRequest);
  }
  lastSubmit.delete(page);
  if (request) {
    const resp = await request.response().catch(() => null);
    const headers = await request.allHeaders().catch(() => ({}));
    lastSubmit.set(page, {
      method: request.method(),
      path: new URL(request.url()).pathname,
      status: resp ? resp.status() : 0,
      origin: headers.origin,
      fetchSite: headers['sec-fetch-site'],
    });
  }
}

async function mustExist(page, locator, what) {
  try {
    await locator.first().waitFor({ state: 'attached', timeout: TIMEOUT });
  } catch {
    fail(`${what} is not on the page${await describe(page)}`);
  }
  const n = await locator.count();
  check(n === 1, `${what} matches ${n} elements on the page, expected one${await describe(page)}`);
}

async function expectPath(page, expected) {
  const ok = typeof expected === 'string' ? (p) => p === expected : (p) => expected.test(p);
  if (!ok(pathOf(page))) fail(`expected to be on ${expected}, but the browser is on ${pathOf(page)}${await describe(page)}`);
}

async function expectH1(page, text) {
  const h1 = page.locator('h1').first();
  try {
    await h1.waitFor({ timeout: TIMEOUT });
  } catch {
    fail(`no h1 on the page, expected ${JSON.stringify(text)}${await describe(page)}`);
  }
  const actual = ((await h1.textContent()) || '').replace(/\s+/g, ' ').trim();
  if (actual !== text) fail(`h1 is ${JSON.stringify(actual)}, expected ${JSON.stringify(text)}${await describe(page)}`);
}

async function expectVisible(page, locator, what) {
  try {
    await locator.first().waitFor({ state: 'visible', timeout: TIMEOUT });
  } catch {
    fail(`${what} is not visible${await describe(page)}`);
  }
}

async function textOf(page, locator, what) {
  await mustExist(page, locator, what);
  return ((await locator.textContent()) || '').trim();
}

async function shot(page, name) {
  const file = path.join(ARTIFACTS, `${name}.png`);
  await page.screenshot({ path: file, fullPage: true });
  shots[name] = file;
}

// The CSRF token of the signed-in session (the hidden field of the sign-out form).
async function csrfOf(page) {
  const field = page.locator('input[type=hidden][name=csrf]').first();
  await mustExist(page, field, 'a hidden csrf field (the sign-out form)');
  return field.inputValue();
}

async function gatewayCall(secret) {
  const resp = await fetch(`${gatewayBase}/demo/echo`, { headers: { authorization: `Bearer ${secret}` } });
  const text = await resp.text();
  let json = null;
  try {
    json = JSON.parse(text);
  } catch {
    // not JSON; reported by the caller
  }
  return { status: resp.status, json, text };
}

// ---------------------------------------------------------------------------------------------
// Flows shared by several people

async function createApp(page, name) {
  await goto(page, '/apps');
  await page.getByLabel('App name').fill(name);
  await clickAndLoad(page, page.getByRole('button', { name: 'Create app' }), 'the "Create app" button');
  await goto(page, '/apps');
  const rows = page.locator('table tbody tr').filter({ hasText: name });
  await expectVisible(page, rows, `a row for app ${JSON.stringify(name)} in the apps table`);
}

// Fills /tokens/new and submits; returns { secret, id, formAction } from the "Token created" page.
async function createToken(page, { name, app, onCreated }) {
  await goto(page, '/tokens/new');
  await page.getByLabel(/^\s*Name\b/).fill(name);
  const appSelect = page.getByLabel(/^\s*App\b/);
  await mustExist(page, appSelect, 'the select labelled "App"');
  await appSelect.selectOption({ label: app });
  // Scopes: checkboxes named "scopes" when the workspace has a scope catalog, else a text field.
  // Left empty either way (the demo route needs no scope).
  const expires = page.getByLabel(/^\s*Expires\b/);
  await mustExist(page, expires, 'the select labelled "Expires"');
  await expires.selectOption({ label: '30 days' });
  const button = page.getByRole('button', { name: 'Create token' });
  const form = await formOf(button);
  await clickAndLoad(page, button, 'the "Create token" button');
  await expectH1(page, 'Token created');
  const created = await readCreated(page);
  if (onCreated) await onCreated(page);
  return { ...created, form };
}

// The action and the fields (as the browser would send them) of a submit button's form, to replay
// the same POST as another person.
async function formOf(button) {
  return button.evaluate((b) => {
    if (!b.form) return null;
    const fields = {};
    for (const [k, v] of new FormData(b.form, b)) if (typeof v === 'string') fields[k] = v;
    return { action: b.form.action, fields };
  });
}

// Replays a form captured by formOf with another session's csrf token; returns the response.
async function replay(page, form, csrf) {
  return page.request.post(form.action, { form: { ...form.fields, csrf }, maxRedirects: 0 });
}

// Reads the secret and the token id from a "Token created" page.
async function readCreated(page) {
  const secret = await textOf(page, page.locator('code#token-secret'), 'code#token-secret');
  check(secret.length > 20, `code#token-secret holds ${JSON.stringify(secret)}, which does not look like a token`);
  const link = page.getByRole('link', { name: 'Go to the token' });
  await mustExist(page, link, 'the link "Go to the token"');
  const href = await link.getAttribute('href');
  const m = new URL(href, base).pathname.match(/^\/tokens\/(tok_[A-Za-z0-9]+)$/);
  check(m, `the link "Go to the token" points to ${href}, expected /tokens/tok_…`);
  return { secret, id: m[1], href: new URL(href, base).pathname };
}

// The owner invites someone; returns the invitation URL.
async function invite(page, email, role) {
  await goto(page, '/members');
  // The invitation form: the one with the "Invite" button (the members table has Role selects too).
  const button = page.getByRole('button', { name: 'Invite', exact: true });
  await mustExist(page, button, 'the "Invite" button');
  const form = page.locator('form').filter({ has: button });
  await form.getByLabel(/^\s*Email\b/).fill(email);
  const roleSelect = form.getByLabel(/^\s*Role\b/);
  await mustExist(page, roleSelect, 'the select labelled "Role"');
  const options = (await roleSelect.locator('option').allTextContents()).map((o) => o.trim().toLowerCase());
  for (const r of ['owner', 'admin', 'developer', 'viewer']) {
    check(options.some((o) => o === r || o.startsWith(`${r} `)), `the Role select has no option ${r}: ${JSON.stringify(options)}`);
  }
  const value = await roleSelect.locator('option').evaluateAll(
    (opts, r) => (opts.find((o) => o.textContent.trim().toLowerCase().startsWith(r)) || {}).value,
    role,
  );
  await roleSelect.selectOption(value);
  const fields = await formOf(button);
  await clickAndLoad(page, button, 'the "Invite" button');
  const link = await textOf(page, page.locator('code#invite-link'), 'code#invite-link (the invitation link)');
  check(link, 'code#invite-link is empty');
  return { link: new URL(link, base).toString(), form: fields };
}

// Opens an invitation in a new browser context (no cookies) and joins; returns the session.
async function join(browser, inviteUrl, person) {
  const session = await newSession(browser);
  const { page } = session;
  const resp = await page.goto(inviteUrl);
  check(resp && resp.status() === 200, `GET ${inviteUrl} answered ${resp && resp.status()}${await describe(page)}`);
  await page.getByLabel(/^\s*Your name\b/).fill(person.name);
  await page.getByLabel(/^\s*Password\b/).fill(person.password);
  await clickAndLoad(page, page.getByRole('button', { name: 'Join workspace' }), 'the "Join workspace" button');
  await expectPath(page, '/');
  await expectH1(page, `Welcome, ${person.name}`);
  return session;
}

// ---------------------------------------------------------------------------------------------
// The scenarios

/** Runs axe-core on `pages` with `owner`'s session; throws on any serious or critical WCAG 2 A/AA
 * violation. axe is injected as a script, which the dashboard's CSP forbids (rightly): this one
 * context bypasses it. */
async function expectAccessible(browser, owner, pages) {
  const state = await owner.context().storageState();
  const context = await browser.newContext({ bypassCSP: true, storageState: state, viewport: { width: 1280, height: 800 } });
  const page = await context.newPage();
  currentPage = page;
  const axePath = path.join(ROOT, 'tests', 'browser', 'node_modules', 'axe-core', 'axe.min.js');
  const problems = [];
  for (const p of pages) {
    await goto(page, p);
    await page.addScriptTag({ path: axePath });
    const result = await page.evaluate(async () =>
      // eslint-disable-next-line no-undef
      axe.run(document, { runOnly: { type: 'tag', values: ['wcag2a', 'wcag2aa', 'wcag21a', 'wcag21aa'] } }),
    );
    if (!result.passes.length) throw new Error(`axe checked nothing on ${p}`);
    for (const v of result.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical')) {
      const where = v.nodes.slice(0, 3).map((n) => n.target.join(' ')).join('; ');
      problems.push(`${p}: ${v.id} (${v.impact}): ${v.help} — ${where}`);
    }
  }
  await context.close();
  currentPage = owner;
  if (problems.length) throw new Error(`accessibility violations:\n      ${problems.join('\n      ')}`);
}

async function run(browser, kg) {
  const { page: owner } = await newSession(browser);
  const ctx = {};

  await step('first visit: / redirects to /setup', async () => {
    await goto(owner, '/');
    await expectPath(owner, '/setup');
    await shot(owner, '01-setup');
  });

  await step('setup: create the owner account with the setup code', async () => {
    await owner.getByLabel(/^\s*Setup code\b/).fill(kg.setupCode);
    await owner.getByLabel(/^\s*Your name\b/).fill(OWNER.name);
    await owner.getByLabel(/^\s*Email\b/).fill(OWNER.email);
    await owner.getByLabel(/^\s*Password\b/).fill(OWNER.password);
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Create owner account' }), 'the "Create owner account" button');
    await expectPath(owner, '/');
    await expectH1(owner, `Welcome, ${OWNER.name}`);
    await shot(owner, '02-home-first-visit');
  });

  await step('setup is closed once an owner exists', async () => {
    const resp = await owner.request.get(url('/setup'), { maxRedirects: 0 });
    check(resp.status() !== 200 || !(await resp.text()).includes('Create owner account'),
      `GET /setup still shows the setup form after the owner exists (status ${resp.status()})`);
  });

  await step('two-factor: enrol with a TOTP app', async () => {
    await goto(owner, '/account/security');
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Set up two-factor sign-in' }), 'the "Set up two-factor sign-in" button');
    await expectVisible(owner, owner.locator('img#totp-qr'), 'the QR code img#totp-qr');
    const loaded = await owner.locator('img#totp-qr').evaluate((img) => img.complete && img.naturalWidth > 0);
    check(loaded, `img#totp-qr did not load an image (src ${await owner.locator('img#totp-qr').getAttribute('src')})`);
    const secret = await textOf(owner, owner.locator('code#totp-secret'), 'the secret code#totp-secret');
    ctx.totp = new Totp(secret);
    await shot(owner, '03-security-2fa-enrol');
    await owner.getByLabel(/^\s*Code from your app\b/).fill(ctx.totp.next());
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Turn on two-factor' }), 'the "Turn on two-factor" button');
    const codes = owner.locator('ul#recovery-codes li');
    await expectVisible(owner, codes, 'the recovery codes ul#recovery-codes');
    const n = await codes.count();
    check(n === 10, `ul#recovery-codes has ${n} items, expected 10`);
    const notice = owner.getByText('Two-factor sign-in is on');
    await expectVisible(owner, notice, 'the notice "Two-factor sign-in is on"');
    await shot(owner, '04-security-recovery-codes');
  });

  await step('sign out, then sign in with password and a TOTP code', async () => {
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Sign out' }), 'the header button "Sign out"');
    await expectPath(owner, '/login');
    await owner.getByLabel(/^\s*Email\b/).fill(OWNER.email);
    await owner.getByLabel(/^\s*Password\b/).fill(OWNER.password);
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Sign in' }), 'the "Sign in" button');
    await expectPath(owner, '/login/2fa');
    await owner.locator('#code').fill(ctx.totp.next());
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Verify' }), 'the "Verify" button');
    await expectPath(owner, '/');
    await expectH1(owner, `Welcome, ${OWNER.name}`);
  });

  await step('apps: create the app "billing"', async () => {
    await createApp(owner, 'billing');
  });

  await step('tokens: create a token for "billing" (30 days)', async () => {
    const t = await createToken(owner, {
      name: 'billing-ci',
      app: 'billing',
      onCreated: (p) => shot(p, '06-token-created'),
    });
    ctx.token = t;
  });

  await step('tokens: the list shows the new token', async () => {
    await goto(owner, '/tokens');
    await expectVisible(owner, owner.getByRole('link', { name: 'billing-ci' }), 'a link "billing-ci" in the tokens list');
    await shot(owner, '05-tokens-list');
  });

  await step('gateway: GET /demo/echo with the token answers 200 with its identity', async () => {
    const r = await gatewayCall(ctx.token.secret);
    check(r.status === 200, `the gateway answered ${r.status} to the new token: ${r.text.slice(0, 300)}`);
    check(r.json && r.json.identity, `the gateway's answer has no identity: ${r.text.slice(0, 300)}`);
    check(r.json.identity.token_id === ctx.token.id,
      `identity.token_id is ${r.json.identity.token_id}, expected ${ctx.token.id} (from the "Go to the token" link)`);
  });

  await step('token page: the usage total counts the call and the chart is drawn', async () => {
    await goto(owner, ctx.token.href);
    await mustExist(owner, owner.locator('svg#usage-chart'), 'the usage chart svg#usage-chart');
    // The one allowed wait: usage is flushed every second; reload every 500 ms, at most 15 s.
    const deadline = Date.now() + 15_000;
    let total = NaN;
    let raw = '';
    for (;;) {
      raw = await textOf(owner, owner.locator('#usage-total'), 'the usage total #usage-total');
      total = Number.parseInt(raw.replace(/[^0-9]/g, ''), 10);
      if (total >= 1 || Date.now() > deadline) break;
      await new Promise((r) => setTimeout(r, 500));
      await goto(owner, ctx.token.href);
    }
    check(total >= 1, `#usage-total still reads ${JSON.stringify(raw)} 15 s after a gateway call with the token`);
    await mustExist(owner, owner.locator('svg#usage-chart'), 'the usage chart svg#usage-chart');
    await shot(owner, '07-token-page-usage');
  });

  await step('home: the summary after the token exists', async () => {
    await goto(owner, '/');
    await expectH1(owner, `Welcome, ${OWNER.name}`);
    await shot(owner, '02-home');
  });

  await step('rotate: no grace period; the old secret is refused, the new one works', async () => {
    await goto(owner, ctx.token.href);
    const grace = owner.getByLabel(/^\s*Grace period\b/);
    await mustExist(owner, grace, 'the select labelled "Grace period"');
    await grace.selectOption({ label: 'None' });
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Rotate token' }), 'the "Rotate token" button');
    await expectH1(owner, 'Token created');
    const rotated = await readCreated(owner);
    check(rotated.secret !== ctx.token.secret, 'the rotated token shows the same secret as before');
    const old = await gatewayCall(ctx.token.secret);
    check(old.status === 401, `the gateway answered ${old.status} to the old secret after a rotation without grace, expected 401`);
    const fresh = await gatewayCall(rotated.secret);
    check(fresh.status === 200, `the gateway answered ${fresh.status} to the rotated secret, expected 200: ${fresh.text.slice(0, 300)}`);
    check(fresh.json?.identity?.token_id === rotated.id,
      `the rotated secret is token ${fresh.json?.identity?.token_id}, but "Go to the token" points to ${rotated.id}`);
    ctx.rotated = rotated;
  });

  await step('revoke: with a reason; the page shows "revoked" and the gateway refuses it', async () => {
    await goto(owner, ctx.rotated.href);
    await clickAndLoad(owner, owner.getByRole('link', { name: /^Revoke(…|\.\.\.)$/ }), 'the link "Revoke…"');
    await owner.getByLabel(/^\s*Reason\b/).fill('browser test: no longer needed');
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Revoke token' }), 'the "Revoke token" button');
    await expectPath(owner, ctx.rotated.href);
    const badge = owner.locator('.badge').filter({ hasText: /^\s*revoked\s*$/ });
    await expectVisible(owner, badge, 'a badge "revoked"');
    const r = await gatewayCall(ctx.rotated.secret);
    check(r.status === 401, `the gateway answered ${r.status} to the revoked token, expected 401`);
  });

  await step('OAuth client: register one on the page of "billing"; the secret, shown once, gets a token', async () => {
    await goto(owner, '/apps');
    await clickAndLoad(owner, owner.getByRole('link', { name: 'billing', exact: true }), 'the link "billing" in the apps table');
    await expectH1(owner, 'billing');
    ctx.appHref = pathOf(owner);
    await owner.getByLabel(/refresh token/).check();
    await owner.getByLabel(/^\s*Access-token lifetime\b/).fill('600');
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Register OAuth client' }), 'the "Register OAuth client" button');
    await expectH1(owner, 'OAuth client registered');
    const clientId = await textOf(owner, owner.locator('code#client-id'), 'code#client-id');
    const secret = await textOf(owner, owner.locator('code#client-secret'), 'code#client-secret');
    await shot(owner, '11-oauth-client-created');
    const tokenRequest = () => fetch(`${gatewayBase}/oauth2/token`, {
      method: 'POST',
      headers: {
        authorization: `Basic ${Buffer.from(`${clientId}:${secret}`).toString('base64')}`,
        'content-type': 'application/x-www-form-urlencoded',
      },
      body: 'grant_type=client_credentials',
    });
    const resp = await tokenRequest();
    const text = await resp.text();
    check(resp.status === 200 && text.includes('"access_token"'), `/oauth2/token answered ${resp.status}: ${text.slice(0, 300)}`);
    await goto(owner, ctx.appHref);
    const html = await owner.content();
    check(html.includes(clientId) && !html.includes(secret), 'the app page shows the client id, and not the secret again');
    await expectVisible(owner, owner.getByRole('button', { name: 'Rotate secret' }), 'the "Rotate secret" button');
    ctx.client = { id: clientId, tokenRequest };
  });

  await step('OAuth client: suspended with a reason, refused at the token endpoint, then resumed', async () => {
    await goto(owner, ctx.appHref);
    await owner.getByLabel(/^\s*Reason\b/).fill('browser test: suspected leak');
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Suspend client' }), 'the "Suspend client" button');
    const status = await textOf(owner, owner.locator('#client-status'), '#client-status');
    check(status.includes('suspended') && status.includes('browser test: suspected leak'),
      `the client's status reads ${JSON.stringify(status)}, expected "suspended" with the reason`);
    const refused = await ctx.client.tokenRequest();
    const body = await refused.text();
    check(refused.status === 400 && body.includes('unauthorized_client'),
      `/oauth2/token answered ${refused.status} to a suspended client, expected 400 unauthorized_client: ${body.slice(0, 300)}`);
    await shot(owner, '11b-oauth-client-suspended');
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Resume client' }), 'the "Resume client" button');
    const resumed = await textOf(owner, owner.locator('#client-status'), '#client-status');
    check(resumed.includes('active'), `the client's status reads ${JSON.stringify(resumed)} after a resume, expected "active"`);
    const again = await ctx.client.tokenRequest();
    check(again.status === 200, `/oauth2/token answered ${again.status} to the resumed client, expected 200`);
  });

  await step('audit log: lists token.revoke; CSV and JSON exports', async () => {
    await goto(owner, '/audit');
    const row = owner.locator('table tbody tr').filter({ hasText: 'token.revoke' });
    await expectVisible(owner, row, 'a row with token.revoke in the audit table');
    await shot(owner, '08-audit-log');
    const csvLink = owner.getByRole('link', { name: 'Export CSV' });
    await mustExist(owner, csvLink, 'the link "Export CSV"');
    const csvResp = await owner.request.get(new URL(await csvLink.getAttribute('href'), owner.url()).toString());
    check(csvResp.status() === 200, `Export CSV answered ${csvResp.status()}`);
    const csv = await csvResp.text();
    const header = csv.split(/\r?\n/)[0];
    check(/^at,actor,action,target\b/.test(header), `the CSV's first line is ${JSON.stringify(header)}, expected a header starting at,actor,action,target`);
    check(csv.includes('token.revoke'), 'the CSV export has no token.revoke event');
    const jsonLink = owner.getByRole('link', { name: 'Export JSON' });
    await mustExist(owner, jsonLink, 'the link "Export JSON"');
    const jsonResp = await owner.request.get(new URL(await jsonLink.getAttribute('href'), owner.url()).toString());
    check(jsonResp.status() === 200, `Export JSON answered ${jsonResp.status()}`);
    let events;
    try {
      events = JSON.parse(await jsonResp.text());
    } catch (e) {
      fail(`Export JSON is not JSON: ${e.message}`);
    }
    check(Array.isArray(events), `Export JSON is not an array but ${typeof events}`);
    check(events.some((e) => JSON.stringify(e).includes('token.revoke')), 'the JSON export has no token.revoke event');
  });

  await step('CSRF: a POST without the csrf field is refused with 403', async () => {
    // Control first: the same request with the session's csrf token works, so the refusal below
    // is the CSRF check's and not a session the request context failed to send.
    await goto(owner, '/apps');
    const csrf = await csrfOf(owner);
    const control = await owner.request.post(url('/apps'), { form: { name: 'csrf-control', csrf }, maxRedirects: 0 });
    check(control.status() < 400, `the control POST /apps with the csrf field answered ${control.status()}: ${(await control.text()).slice(0, 300)}`);
    const resp = await owner.request.post(url('/apps'), { form: { name: 'forged' }, maxRedirects: 0 });
    check(resp.status() === 403, `POST /apps without csrf answered ${resp.status()}, expected 403`);
    await goto(owner, '/apps');
    const control2 = await owner.locator('table').filter({ hasText: 'csrf-control' }).count();
    check(control2 === 1, 'the control POST (with csrf) did not create the app "csrf-control"');
    const forged = await owner.locator('table').filter({ hasText: 'forged' }).count();
    check(forged === 0, 'the app "forged" was created by a POST without a CSRF token');
  });

  // Members and roles.
  await step('members: invite a viewer; the viewer joins in a fresh browser', async () => {
    const inv = await invite(owner, VIEWER.email, 'viewer');
    ctx.inviteForm = inv.form;
    await shot(owner, '09-members');
    ctx.viewer = await join(browser, inv.link, VIEWER);
  });

  await step('viewer: no "Create a token", /tokens/new is 403, POSTs are refused', async () => {
    const { page } = ctx.viewer;
    currentPage = page;
    await goto(page, '/');
    const create = await page.getByRole('link', { name: 'Create a token' }).count();
    check(create === 0, 'the viewer sees a "Create a token" link on /');
    await goto(page, '/tokens/new', { expectStatus: 403 });
    await goto(page, '/');
    const csrf = await csrfOf(page);
    // A 403 must be the role's refusal, not the CSRF check's (whose message says "CSRF check").
    const refused = async (resp, what) => {
      const body = await resp.text();
      check(resp.status() === 403, `a viewer's ${what} answered ${resp.status()}, expected 403`);
      check(!/CSRF check/.test(body), `a viewer's ${what} was refused by the CSRF check, not for the role: the viewer's csrf token should have been good. The page said: ${body.replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim().slice(0, 300)}`);
    };
    await refused(await page.request.post(url('/apps'), { form: { name: 'viewer-app', csrf }, maxRedirects: 0 }), 'POST /apps');
    // The owner's own token and invitation forms, replayed with the viewer's session and csrf.
    const tokenForm = { ...ctx.token.form, fields: { ...ctx.token.form.fields, name: 'viewer-token' } };
    await refused(await replay(page, tokenForm, csrf), `POST ${new URL(tokenForm.action).pathname} (create token)`);
    const inviteForm = { ...ctx.inviteForm, fields: { ...ctx.inviteForm.fields, email: 'mallory@example.com', role: 'owner' } };
    await refused(await replay(page, inviteForm, csrf), `POST ${new URL(inviteForm.action).pathname} (invite)`);
    currentPage = owner;
    await goto(owner, '/apps');
    check((await owner.locator('table').filter({ hasText: 'viewer-app' }).count()) === 0, 'the viewer\'s POST created the app "viewer-app"');
    await goto(owner, '/tokens');
    check((await owner.getByText('viewer-token').count()) === 0, 'the viewer\'s POST created the token "viewer-token"');
  });

  await step('members: invite two developers; both join', async () => {
    currentPage = owner;
    const a = await invite(owner, DEV_A.email, 'developer');
    const b = await invite(owner, DEV_B.email, 'developer');
    ctx.devA = await join(browser, a.link, DEV_A);
    ctx.devB = await join(browser, b.link, DEV_B);
  });

  await step('developer A: creates an app and a token', async () => {
    const { page } = ctx.devA;
    currentPage = page;
    await createApp(page, 'dana-app');
    ctx.devAToken = await createToken(page, { name: 'dana-token', app: 'dana-app' });
    const r = await gatewayCall(ctx.devAToken.secret);
    check(r.status === 200, `the gateway answered ${r.status} to developer A's token`);
  });

  await step("plan ceilings: the owner puts A's app on a plan of 10 a minute; A is refused more, on the form and on the app's shared limits", async () => {
    currentPage = owner;
    await goto(owner, '/settings');
    await owner.getByLabel('Plan name').fill('starter');
    await owner.getByLabel(/^\s*Rate limit\b/).fill('10');
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Create plan' }), 'the "Create plan" button');
    await goto(owner, '/apps');
    const row = owner.locator('table tbody tr').filter({ hasText: 'dana-app' });
    await row.getByLabel('Plan').selectOption({ label: 'starter' });
    await clickAndLoad(owner, row.getByRole('button', { name: 'Change plan' }), 'the "Change plan" button of dana-app');
    const { page } = ctx.devA;
    currentPage = page;
    await goto(page, '/tokens/new');
    await page.getByLabel(/^\s*Name\b/).fill('dana-greedy');
    await page.getByLabel(/^\s*App\b/).selectOption({ label: 'dana-app' });
    await page.getByLabel(/^\s*Rate limit\b/).fill('100');
    await clickAndLoad(page, page.getByRole('button', { name: 'Create token' }), 'the "Create token" button');
    const refused = await page.locator('main').innerText();
    check(refused.includes('starter') && refused.includes('plan'), `the form does not say the plan refused it:\n${refused.slice(0, 600)}`);
    await page.getByLabel(/^\s*Rate limit\b/).fill('10');
    await clickAndLoad(page, page.getByRole('button', { name: 'Create token' }), 'the "Create token" button');
    await expectH1(page, 'Token created');
    // The app's shared limits: above the plan refused, within it saved and shown.
    await goto(page, '/apps');
    await clickAndLoad(page, page.getByRole('link', { name: 'dana-app' }), 'the link to dana-app');
    ctx.danaAppHref = new URL(page.url()).pathname;
    await page.getByLabel(/^\s*Rate limit\b/).fill('50');
    await clickAndLoad(page, page.getByRole('button', { name: 'Save shared limits' }), 'the "Save shared limits" button');
    check((await page.locator('main').innerText()).includes('starter'), 'a shared limit above the plan is refused on the page');
    await page.getByLabel(/^\s*Rate limit\b/).fill('5');
    await clickAndLoad(page, page.getByRole('button', { name: 'Save shared limits' }), 'the "Save shared limits" button');
    const shown = await textOf(page, page.locator('#app-limits'), 'the shared limits');
    check(shown.includes('5 requests per 60 s'), `the app page shows ${JSON.stringify(shown)}`);
    await shot(page, '15-app-shared-limits');
    await goto(page, `${ctx.danaAppHref}/statement`);
    const month = new Date().toISOString().slice(0, 7);
    await expectH1(page, `Statement of dana-app, ${month}`);
    // The provider's view: the owner's report counts the calls made so far, and draws them.
    currentPage = owner;
    await goto(owner, '/reports?by=app&days=7');
    await expectH1(owner, 'Reports');
    await mustExist(owner, owner.locator('svg#report-chart'), 'the chart of requests per day');
  });

  await step("developer B: A's token page answers 404", async () => {
    const { page } = ctx.devB;
    currentPage = page;
    await goto(page, ctx.devAToken.href, { expectStatus: 404 });
  });

  await step('phone-sized screen: pages fit 390 px without sideways scrolling', async () => {
    currentPage = owner;
    await owner.setViewportSize({ width: 390, height: 844 });
    for (const p of ['/', '/tokens', '/tokens/new', '/audit', '/portal', '/routes', '/apis', '/ai', '/reports', ctx.appHref, '/settings', '/workspaces']) {
      await goto(owner, p);
      const overflow = await owner.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
      if (overflow > 1) throw new Error(`${p} is ${overflow} px wider than a 390 px screen`);
    }
    await goto(owner, '/');
    await shot(owner, '10-home-phone');
    await owner.setViewportSize({ width: 1280, height: 800 });
  });

  await step('accessibility: axe-core finds no serious or critical WCAG 2 A/AA violation', async () => {
    const pages = ['/', '/tokens', '/tokens/new', ctx.devAToken.href, '/apps', ctx.appHref, `${ctx.appHref}/statement`, '/reports', '/audit', '/members', '/settings', '/settings/signing-keys/rotate', '/portal', '/portal/demo', '/routes', '/apis', '/ai', '/workspaces', '/account/security'];
    await expectAccessible(browser, owner, pages);
  });

  await step('keyboard: the skip link comes first and every field of the token form has a label', async () => {
    currentPage = owner;
    await goto(owner, '/tokens/new');
    await owner.keyboard.press('Tab');
    const first = await owner.evaluate(() => document.activeElement && document.activeElement.textContent.trim());
    if (first !== 'Skip to content') throw new Error(`the first Tab stop is ${JSON.stringify(first)}, not the skip link`);
    const unlabelled = await owner.evaluate(() =>
      [...document.querySelectorAll('main input:not([type=hidden]), main select, main textarea')]
        .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label'))
        .map((el) => el.name || el.id),
    );
    if (unlabelled.length) throw new Error(`fields without a label: ${unlabelled.join(', ')}`);
  });

  await step('root keys: an owner creates one (shown once) and revokes it', async () => {
    currentPage = owner;
    await goto(owner, '/settings/root-keys');
    await owner.fill('#rk-name', 'browser key');
    await owner.check('input[name=permission][value="tokens:read"]');
    await owner.selectOption('#rk-lifetime', '30');
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Create root key' }), 'create a root key');
    const secret = (await textOf(owner, owner.locator('#root-key-secret'), 'the new root key')).trim();
    check(secret.startsWith('kgroot_'), `the key shown is ${JSON.stringify(secret)}`);
    await goto(owner, '/settings/root-keys');
    check(!(await owner.content()).includes(secret.slice(12)), 'the list shows the secret again');
    await clickAndLoad(owner, owner.locator('tr', { hasText: 'browser key' }).getByRole('link', { name: 'Revoke…' }), 'open the revoke page');
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Revoke root key' }), 'revoke the root key');
    await expectPath(owner, '/settings/root-keys');
    const row = await textOf(owner, owner.locator('tr', { hasText: 'browser key' }), 'the revoked key');
    check(row.includes('revoked'), `the key's row reads ${JSON.stringify(row)}`);
  });

  await step('webhooks: an owner adds an endpoint (secret shown once), sends a test event, sees the delivery log', async () => {
    currentPage = owner;
    await goto(owner, '/settings/webhooks');
    await owner.fill('#wh-url', 'https://hooks.example.com/keygate');
    await owner.fill('#wh-description', 'browser test');
    await owner.check('input[name=event_type][value="token.exposed"]');
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Add endpoint' }), 'add a webhook endpoint');
    const secret = (await textOf(owner, owner.locator('#webhook-secret'), 'the signing secret')).trim();
    check(secret.startsWith('whsec_'), `the secret shown is ${JSON.stringify(secret)}`);
    await clickAndLoad(owner, owner.getByRole('link', { name: 'Go to the endpoint' }), 'open the endpoint');
    check(!(await owner.content()).includes(secret), 'the endpoint page shows the secret again');
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Send a test event' }), 'send a test event');
    await expectVisible(owner, owner.locator('td', { hasText: 'webhook.test' }), 'the test delivery in the log');
    ctx.webhookHref = new URL(owner.url()).pathname;
    await goto(owner, '/account/notifications');
    await expectH1(owner, 'Notifications');
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Save notification settings' }), 'save the notification settings');
    await expectAccessible(browser, owner, ['/settings/webhooks', ctx.webhookHref, '/account/notifications']);
  });

  await step("call log and alerts: a token's calls are listed from its page; the Alerts page renders", async () => {
    currentPage = owner;
    await goto(owner, ctx.token.href);
    await clickAndLoad(owner, owner.getByRole('link', { name: 'Every call of this token' }), "open the token's calls");
    await expectH1(owner, 'Calls');
    const callsHref = new URL(owner.url()).pathname + new URL(owner.url()).search;
    // The call log holds a token's calls up to ten seconds before writing them: reload until the
    // gateway calls made above show (30 s at most).
    let seen = false;
    for (let i = 0; i < 60 && !seen; i++) {
      seen = (await owner.content()).includes('/demo/echo');
      if (!seen) {
        await new Promise((r) => setTimeout(r, 500));
        await goto(owner, callsHref);
      }
    }
    check(seen, "the token's calls through the gateway (/demo/echo) are listed");
    check(!(await owner.content()).includes(ctx.token.secret), 'the calls page shows the secret');
    await goto(owner, '/alerts');
    await expectH1(owner, 'Alerts');
    await expectAccessible(browser, owner, [callsHref, '/alerts']);
  });

  await step('routes: an owner adds a route as TOML; the gateway serves it; a mistake is shown on the form', async () => {
    currentPage = owner;
    await goto(owner, '/routes');
    await expectH1(owner, 'Routes');
    // The upstream is keygate's own admin listener: /browser-api/admin/v1/health is its health check.
    const route = `id = "browser-api"\npath = "/browser-api"\nupstream = "${base}"\nstrip_prefix = true\npublic = true\n`;
    await owner.fill('#route-text', `${route}colour = "red"\n`);
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Add route' }), 'add a route with an unknown field');
    const error = await textOf(owner, owner.locator('#route-error'), 'the error beside the form');
    check(error.includes('invalid_route') && error.includes('colour'), `the form's error reads ${JSON.stringify(error)}`);
    check((await owner.inputValue('#route-text')).includes('colour'), 'the input was not kept');
    await owner.fill('#route-text', route);
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Add route' }), 'add the route');
    await expectPath(owner, '/routes');
    await mustExist(owner, owner.locator('#route-browser-api'), 'the new route in the list');
    await shot(owner, '12-routes');
    const resp = await fetch(`${gatewayBase}/browser-api/admin/v1/health`);
    check(resp.status === 200, `the gateway answers ${resp.status} on the new route`);
    await clickAndLoad(owner, owner.getByRole('link', { name: 'browser-api' }), 'open the route');
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Delete route' }), 'delete the route');
    await expectPath(owner, '/routes');
    const gone = await fetch(`${gatewayBase}/browser-api/admin/v1/health`);
    check(gone.status === 404, `the gateway answers ${gone.status} after the deletion`);
  });

  await step('API lifecycle: an owner creates an API, a route names it, publishes, deprecates with a sunset (the gateway says so), retires (410)', async () => {
    currentPage = owner;
    await goto(owner, '/apis');
    await expectH1(owner, 'API lifecycle');
    await owner.fill('#api-name', 'browser-orders');
    await owner.fill('#api-description', 'Orders, as the browser test sees them');
    await owner.fill('#api-versions', 'v1');
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Create API (draft)' }), 'create an API');
    await expectPath(owner, '/apis');
    const row = await textOf(owner, owner.locator('#api-browser-orders'), 'the new API in the list');
    check(row.includes('draft'), `the new API's row reads ${JSON.stringify(row)}`);
    // A route of the API's version v1; the upstream is keygate's own admin listener.
    await goto(owner, '/routes');
    const route = `id = "browser-orders-v1"\npath = "/browser-orders"\nupstream = "${base}"\nstrip_prefix = true\npublic = true\napi = "browser-orders"\nversion = "v1"\n`;
    await owner.fill('#route-text', route);
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Add route' }), 'add a route of the API');
    await expectPath(owner, '/routes');
    const change = async (state, { version = '', sunset = '', successor = '' } = {}) => {
      await goto(owner, '/apis');
      await owner.locator('select[name=state]').first().selectOption(state);
      await owner.locator('select[name=version]').first().selectOption(version);
      await owner.locator('input[name=sunset]').first().fill(sunset);
      await owner.locator('input[name=successor]').first().fill(successor);
      await clickAndLoad(owner, owner.getByRole('button', { name: 'Change state' }).first(), `make it ${state}`);
      await expectPath(owner, '/apis');
      const notice = await owner.content();
      check(notice.includes('API changed'), `no confirmation after making it ${state}`);
    };
    await change('published');
    await change('published', { version: 'v1' });
    await change('deprecated', { version: 'v1', sunset: '2031-01-01T00:00', successor: '/v2/orders' });
    await shot(owner, '14-apis');
    const dep = await fetch(`${gatewayBase}/browser-orders/admin/v1/health`);
    check(dep.status === 200, `the deprecated route answers ${dep.status}`);
    check(/^@\d+$/.test(dep.headers.get('deprecation') || ''), `Deprecation: ${dep.headers.get('deprecation')}`);
    check(dep.headers.get('sunset') === 'Wed, 01 Jan 2031 00:00:00 GMT', `Sunset: ${dep.headers.get('sunset')}`);
    check(dep.headers.get('link') === '</v2/orders>; rel="successor-version"', `Link: ${dep.headers.get('link')}`);
    await goto(owner, '/portal');
    check((await owner.content()).includes('2031-01-01T00:00:00Z'), 'the portal shows the sunset');
    await change('retired', { version: 'v1' });
    const gone = await fetch(`${gatewayBase}/browser-orders/admin/v1/health`);
    check(gone.status === 410, `the retired route answers ${gone.status}`);
    const body = await gone.json();
    check(body.error && body.error.code === 'api_retired', `the retired route's code is ${JSON.stringify(body)}`);
    await expectAccessible(browser, owner, ['/apis', '/portal']);
  });

  await step('workspaces: the instance owner creates one and sees it listed', async () => {
    currentPage = owner;
    await goto(owner, '/workspaces');
    await expectH1(owner, 'Workspaces');
    await owner.fill('#ws-name', 'browser-team');
    await clickAndLoad(owner, owner.getByRole('button', { name: 'Create workspace' }), 'create a workspace');
    await expectPath(owner, '/workspaces');
    await mustExist(owner, owner.locator('tr', { hasText: 'browser-team' }), 'the new workspace in the list');
    await shot(owner, '13-workspaces');
  });

  await step('/admin/docs: Swagger UI renders its operations under the admin listener\'s CSP', async () => {
    const docs = await owner.context().newPage();
    currentPage = docs;
    const violations = [];
    docs.on('console', (m) => {
      if (/Content Security Policy|Refused to/i.test(m.text())) violations.push(m.text());
    });
    docs.on('pageerror', (e) => violations.push(String(e)));
    const resp = await docs.goto(url('/admin/docs/'), { timeout: TIMEOUT });
    check(resp && resp.status() === 200, `/admin/docs/ answered ${resp && resp.status()}`);
    check((resp.headers()['content-security-policy'] || '').includes("frame-ancestors 'none'"), 'no CSP on /admin/docs/');
    await docs.locator('.opblock').first().waitFor({ timeout: TIMEOUT });
    const operations = await docs.locator('.opblock').count();
    check(operations >= 20, `Swagger UI shows ${operations} operations`);
    check(violations.length === 0, `CSP violations or errors: ${violations.join(' | ')}`);
    await docs.close();
    currentPage = owner;
  });
}

// ---------------------------------------------------------------------------------------------

async function main() {
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  for (const f of fs.readdirSync(ARTIFACTS)) if (f.endsWith('.png')) fs.rmSync(path.join(ARTIFACTS, f));
  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'keygate-browser-'));
  let kg = null;
  let browser = null;
  let failed = null;
  try {
    kg = await step('start keygate', async () => startKeygate(tmp));
    base = kg.dashboard;
    gatewayBase = kg.gateway;
    console.log(`     dashboard ${base}, gateway ${gatewayBase}`);
    browser = await step('launch chromium', async () => {
      check(fs.existsSync(CHROMIUM), `${CHROMIUM} does not exist (apt-get install chromium, or set CHROMIUM)`);
      return chromium.launch({ executablePath: CHROMIUM, headless: !process.env.HEADED, timeout: START_TIMEOUT });
    });
    await run(browser, kg);
  } catch (e) {
    failed = e;
    if (currentPage && !currentPage.isClosed()) {
      await currentPage.screenshot({ path: path.join(ARTIFACTS, 'failure.png'), fullPage: true }).catch(() => {});
    }
  } finally {
    if (browser) await browser.close().catch(() => {});
    if (kg) await kg.stop().catch(() => {});
    fs.rmSync(tmp, { recursive: true, force: true });
  }
  if (shots['02-home']) {
    fs.mkdirSync(path.dirname(DOCS_SHOT), { recursive: true });
    fs.copyFileSync(shots['02-home'], DOCS_SHOT);
  }
  const rel = (p) => path.relative(process.cwd(), p) || p;
  if (failed) {
    console.error(`\nFAILED ${failed.step || '(setup)'}: ${failed instanceof TestFailure ? failed.message : failed.stack || failed}`);
    console.error(`screenshots and keygate.log in ${rel(ARTIFACTS)}/ (failure.png is the page at the failure)`);
    console.log(`browser test: FAILED at step ${stepNo} (the ${stepNo - 1} before it passed)`);
    process.exit(1);
  }
  console.log(`\nscreenshots in ${rel(ARTIFACTS)}/: ${Object.keys(shots).sort().join(', ')}`);
  console.log(`browser test: all ${stepNo} steps passed`);
  process.exit(0);
}

await main();

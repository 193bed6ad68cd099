use super::*;

const MIN: i64 = 60_000;
const DAY: i64 = 86_400_000;
/// A Monday, 00:00 UTC.
const T0: i64 = 1_767_571_200_000;

fn activity(from_ms: i64, to_ms: i64, requests: u64, network: &str) -> Activity {
    Activity {
        subject: Watched::Token(TokenId::from_public_id("abcdefghijkl")),
        from_ms,
        to_ms,
        requests,
        networks: vec![(network.to_owned(), requests)],
        routes: vec![("GET orders".to_owned(), requests)],
        agents: vec![("client/1.0".to_owned(), requests)],
        ..Activity::default()
    }
}

/// A token used steadily at `per_minute` from one network for `minutes`, one window a second.
fn warm(b: &mut Baseline, s: &Sensitivity, start: i64, minutes: i64, per_minute: u64) -> usize {
    let mut found = 0;
    for m in 0..minutes {
        // Spread over the minute: one request every 60/per_minute seconds.
        for k in 0..per_minute {
            let at = start + m * MIN + i64::try_from(k).unwrap() * MIN / i64::try_from(per_minute).unwrap();
            found += b.observe(&activity(at, at + 1000, 1, "198.51.100.0/24"), &NewSightings::default(), s).len();
        }
    }
    found
}

fn kinds(f: &[Finding]) -> Vec<(AlertKind, Severity)> {
    f.iter().map(|x| (x.kind, x.severity)).collect()
}

#[test]
fn networks_are_slash_24_and_slash_48() {
    assert_eq!(network_of("203.0.113.77".parse().unwrap()), "203.0.113.0/24");
    assert_eq!(network_of("::ffff:203.0.113.77".parse().unwrap()), "203.0.113.0/24");
    assert_eq!(network_of("2001:db8:1:2::7".parse().unwrap()), "2001:db8:1::/48");
}

#[test]
fn a_new_token_is_not_alerted_while_it_warms_up() {
    let s = Sensitivity::default();
    let mut b = Baseline::default();
    // Heavy use from its first minute, from a new network each minute: nothing, it is new.
    for m in 0..20 {
        let at = T0 + m * MIN;
        let net = format!("192.0.{m}.0/24");
        let new = NewSightings { networks: vec![net.clone()], ..NewSightings::default() };
        assert!(b.observe(&activity(at, at + 1000, 500, &net), &new, &s).is_empty());
    }
    assert!(!b.established(&s, T0 + 20 * MIN));
}

#[test]
fn a_spike_ten_times_the_usual_rate_is_found_within_ten_seconds() {
    let s = Sensitivity::default();
    let mut b = Baseline::default();
    assert_eq!(warm(&mut b, &s, T0, 90, 12), 0, "steady use raises nothing");
    assert!(b.established(&s, T0 + 90 * MIN));
    assert!((b.overall - 12.0).abs() < 1.0, "{}", b.overall);
    // Now 120 a minute (2 a second) from the same network, starting on a minute boundary.
    let start = T0 + 91 * MIN;
    let mut first = None;
    for sec in 0..60 {
        let at = start + sec * 1000;
        let f = b.observe(&activity(at, at + 1000, 2, "198.51.100.0/24"), &NewSightings::default(), &s);
        if let Some(spike) = f.iter().find(|x| x.kind == AlertKind::RateSpike) {
            first = Some((sec, spike.clone()));
            break;
        }
    }
    let (sec, spike) = first.expect("a spike");
    assert!(sec <= 10, "found after {sec} s");
    assert_eq!(spike.severity, Severity::Medium);
    assert_eq!(spike.evidence["times_usual"], 10.0);
    assert!(spike.summary.contains("120 requests a minute"), "{}", spike.summary);
}

#[test]
fn a_spike_from_a_new_network_is_high() {
    let s = Sensitivity::default();
    let mut b = Baseline::default();
    warm(&mut b, &s, T0, 90, 12);
    let start = T0 + 91 * MIN;
    let net = "203.0.113.0/24";
    let new = NewSightings { networks: vec![net.to_owned()], ..NewSightings::default() };
    let f = b.observe(&activity(start, start + 1000, 2, net), &new, &s);
    assert_eq!(kinds(&f), vec![(AlertKind::NewNetwork, Severity::Low)]);
    assert_eq!(f[0].key, net);
    let mut spike = None;
    for sec in 1..30 {
        let at = start + sec * 1000;
        let f = b.observe(&activity(at, at + 1000, 2, net), &NewSightings::default(), &s);
        if let Some(x) = f.into_iter().find(|x| x.kind == AlertKind::RateSpike) {
            spike = Some(x);
            break;
        }
    }
    let spike = spike.expect("a spike");
    assert_eq!(spike.severity, Severity::High);
    assert_eq!(spike.evidence["new_networks"][0], net);
}

#[test]
fn many_networks_at_once_is_high() {
    let s = Sensitivity::default();
    let mut b = Baseline::default();
    warm(&mut b, &s, T0, 90, 6);
    let at = T0 + 95 * MIN;
    let mut a = activity(at, at + 1000, 0, "x");
    a.networks = (0..8).map(|i| (format!("100.{i}.0.0/24"), 1)).collect();
    a.requests = 8;
    let f = b.observe(&a, &NewSightings::default(), &s);
    assert_eq!(kinds(&f), vec![(AlertKind::ManyNetworks, Severity::High)]);
    assert_eq!(f[0].evidence["networks"].as_array().unwrap().len(), 9);
}

#[test]
fn new_routes_of_an_established_token_are_low() {
    let s = Sensitivity::default();
    let mut b = Baseline::default();
    warm(&mut b, &s, T0, 90, 6);
    let at = T0 + 100 * MIN;
    let mut a = activity(at, at + 1000, 1, "198.51.100.0/24");
    a.routes = vec![("DELETE orders".to_owned(), 1)];
    let new = NewSightings { routes: vec!["DELETE orders".to_owned()], ..NewSightings::default() };
    let f = b.observe(&a, &new, &s);
    assert_eq!(kinds(&f), vec![(AlertKind::NewRoute, Severity::Low)]);
    assert_eq!(f[0].key, "DELETE orders");
}

#[test]
fn a_burst_of_refusals_is_medium_and_a_few_are_nothing() {
    let s = Sensitivity::default();
    let mut b = Baseline::default();
    let at = T0;
    let mut a = activity(at, at + 1000, 10, "198.51.100.0/24");
    a.refused = 5;
    assert!(b.observe(&a, &NewSightings::default(), &s).is_empty());
    let mut a = activity(at + 2000, at + 3000, 20, "198.51.100.0/24");
    a.refused = 20;
    let f = b.observe(&a, &NewSightings::default(), &s);
    assert_eq!(kinds(&f), vec![(AlertKind::RefusalBurst, Severity::Medium)]);
    assert_eq!(f[0].evidence["refused"], 25);
}

#[test]
fn use_after_a_long_dormancy_is_medium() {
    let s = Sensitivity::default();
    let mut b = Baseline::default();
    warm(&mut b, &s, T0, 5, 2);
    let at = T0 + 45 * DAY;
    let f = b.observe(&activity(at, at + 1000, 1, "198.51.100.0/24"), &NewSightings::default(), &s);
    assert_eq!(kinds(&f), vec![(AlertKind::DormantUse, Severity::Medium)]);
    assert_eq!(f[0].evidence["idle_days"], 44);
    // Used again the next minute: nothing more.
    let at = at + MIN;
    assert!(b.observe(&activity(at, at + 1000, 1, "198.51.100.0/24"), &NewSightings::default(), &s).is_empty());
}

#[test]
fn an_old_secret_after_its_grace_is_high_even_for_a_new_token() {
    let s = Sensitivity::default();
    let mut b = Baseline::default();
    let mut a = activity(T0, T0 + 1000, 0, "203.0.113.0/24");
    a.old_secret = 3;
    let f = b.observe(&a, &NewSightings::default(), &s);
    assert_eq!(kinds(&f), vec![(AlertKind::OldSecret, Severity::High)]);
    assert_eq!(f[0].evidence["presented"], 3);
}

#[test]
fn the_hour_of_the_day_sets_the_usual_rate() {
    let s = Sensitivity::default();
    let mut b = Baseline::default();
    // Eight days: 100 a minute from 09:00 to 10:00, 5 a minute from 10:00 to 11:00.
    for d in 0..8 {
        warm(&mut b, &s, T0 + d * DAY + 9 * 60 * MIN, 60, 100);
        warm(&mut b, &s, T0 + d * DAY + 10 * 60 * MIN, 60, 5);
    }
    assert!((b.expected_per_minute(T0 + 9 * 60 * MIN) - 100.0).abs() < 5.0);
    // 100 a minute at 09:00 is the usual; at 10:00 it is a spike.
    let day = T0 + 9 * DAY;
    assert_eq!(warm(&mut b, &s, day + 9 * 60 * MIN, 3, 100), 0);
    let mut found = Vec::new();
    for sec in 0..30 {
        let at = day + 10 * 60 * MIN + sec * 1000;
        found.extend(b.observe(&activity(at, at + 1000, 2, "198.51.100.0/24"), &NewSightings::default(), &s));
    }
    assert!(found.iter().any(|f| f.kind == AlertKind::RateSpike), "{found:?}");
}

/// A small deterministic generator for the synthetic traffic (xorshift64*).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
    /// A Poisson draw of mean `mean` (Knuth's method, fine for the small means here).
    fn poisson(&mut self, mean: f64) -> u64 {
        let l = (-mean).exp();
        let (mut k, mut p) = (0u64, 1.0);
        loop {
            p *= self.unit();
            if p <= l {
                return k;
            }
            k += 1;
        }
    }
}

/// The false-positive rate on synthetic normal traffic (docs/notifications.md reports it): 100
/// tokens for 10 days, one window per 20 seconds, each with a daily cycle (its peak 2–60 requests a minute at its own hour,
/// a tenth of it at night, weekends at half), Poisson arrivals per second, two to four networks
/// of its own (clients behind NAT, a mobile carrier's pool), its three routes, one idle day in
/// seven. At the default sensitivity nothing of medium or high severity is raised; the low ones
/// (a network or route first seen after the warm-up) are counted.
#[test]
fn normal_traffic_pages_nobody() {
    let s = Sensitivity::default();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (tokens, days) = (100, 10);
    let (mut paging, mut low, mut requests) = (Vec::new(), 0usize, 0u64);
    for t in 0..tokens {
        let peak = 2.0 + rng.unit() * 58.0;
        let peak_hour = (rng.next() % 24) as i64;
        let nets: Vec<String> = (0..2 + rng.next() % 3).map(|i| format!("10.{t}.{i}.0/24")).collect();
        let idle_day = (rng.next() % 7) as i64;
        let mut b = Baseline::default();
        let mut known = KnownValues::default();
        for d in 0..days {
            if d % 7 == idle_day {
                continue;
            }
            let weekend = matches!(d % 7, 5 | 6);
            for minute in 0..24 * 60 {
                let hour = minute / 60;
                let dist = ((hour - peak_hour).rem_euclid(24)).min((peak_hour - hour).rem_euclid(24)) as f64;
                let shape = 0.1 + 0.9 * (-(dist * dist) / 18.0).exp();
                let per_minute = peak * shape * if weekend { 0.5 } else { 1.0 };
                // One window per 20 seconds (the sum of twenty one-second windows).
                for w in 0..3 {
                    let n = rng.poisson(per_minute / 3.0);
                    if n == 0 {
                        continue;
                    }
                    requests += n;
                    let at = T0 + d * DAY + minute * MIN + w * 20_000;
                    let net = &nets[(rng.next() % nets.len() as u64) as usize];
                    let route = ["GET orders", "GET orders/{id}", "POST orders"][(rng.next() % 3) as usize];
                    let mut a = activity(at, at + 20_000, n, net);
                    a.routes = vec![(route.to_owned(), n)];
                    let mut new = NewSightings::default();
                    for (kind, v) in unknown_values(&a, &known) {
                        match kind {
                            "network" => new.networks.push(v.clone()),
                            "route" => new.routes.push(v.clone()),
                            _ => new.agents.push(v.clone()),
                        }
                        known.insert(kind, v);
                    }
                    for f in b.observe(&a, &new, &s) {
                        if f.severity >= Severity::Medium {
                            paging.push((t, d, minute, f.kind, f.summary));
                        } else {
                            low += 1;
                        }
                    }
                }
            }
        }
    }
    assert!(requests > 5_000_000, "{requests}");
    assert!(
        paging.is_empty(),
        "{} medium or high alerts on normal traffic: {:?}",
        paging.len(),
        &paging[..paging.len().min(5)]
    );
    // A token's networks and routes are seen within its warm-up, so nothing low either here.
    assert_eq!(low, 0);
}

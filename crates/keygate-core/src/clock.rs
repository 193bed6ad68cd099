//! Time as the domain sees it: a millisecond [`Timestamp`] and the [`Clock`] it is read from, so
//! tests drive time with a [`ManualClock`] instead of sleeping.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Milliseconds since the Unix epoch, UTC. Serialized as an RFC 3339 string.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(i64);

impl Timestamp {
    pub const fn from_millis(ms: i64) -> Self {
        Self(ms)
    }
    pub const fn as_millis(self) -> i64 {
        self.0
    }
    /// This instant plus `secs` seconds, saturating instead of overflowing.
    pub fn plus_seconds(self, secs: i64) -> Self {
        Self(self.0.saturating_add(secs.saturating_mul(1000)))
    }
    /// Parses an RFC 3339 date-time (`2026-01-31T12:00:00Z`).
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let dt = OffsetDateTime::parse(s, &Rfc3339).ok()?;
        i64::try_from(dt.unix_timestamp_nanos() / 1_000_000).ok().map(Self)
    }
    pub fn to_rfc3339(self) -> String {
        let nanos = i128::from(self.0) * 1_000_000;
        OffsetDateTime::from_unix_timestamp_nanos(nanos)
            .ok()
            .and_then(|dt| dt.format(&Rfc3339).ok())
            .unwrap_or_else(|| self.0.to_string())
    }
}

impl fmt::Debug for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Self::parse_rfc3339(&s)
            .ok_or_else(|| serde::de::Error::custom("expected an RFC 3339 date-time such as 2030-01-31T12:00:00Z"))
    }
}

/// Where the current time comes from.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> Timestamp;
}

/// The wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Timestamp {
        let nanos = OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000;
        Timestamp(i64::try_from(nanos).unwrap_or(i64::MAX))
    }
}

/// A clock that moves only when told to; clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<AtomicI64>);

impl ManualClock {
    pub fn new(start: Timestamp) -> Self {
        Self(Arc::new(AtomicI64::new(start.0)))
    }
    pub fn advance_seconds(&self, secs: i64) {
        self.0.fetch_add(secs.saturating_mul(1000), Ordering::SeqCst);
    }
    pub fn set(&self, t: Timestamp) {
        self.0.store(t.0, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(self.0.load(Ordering::SeqCst))
    }
}

/// Formats Unix seconds as an HTTP date (RFC 9110 IMF-fixdate): `Sun, 06 Nov 1994 08:49:37 GMT`.
pub fn imf_fixdate(secs: u64) -> [u8; 29] {
    const DAYS: [&[u8; 3]; 7] = [b"Thu", b"Fri", b"Sat", b"Sun", b"Mon", b"Tue", b"Wed"];
    const MONTHS: [&[u8; 3]; 12] =
        [b"Jan", b"Feb", b"Mar", b"Apr", b"May", b"Jun", b"Jul", b"Aug", b"Sep", b"Oct", b"Nov", b"Dec"];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let mut out = *b"Thu, 01 Jan 1970 00:00:00 GMT";
    let two = |v: u64, at: &mut [u8]| {
        if let [a, b] = at {
            *a = b'0' + (v / 10 % 10) as u8;
            *b = b'0' + (v % 10) as u8;
        }
    };
    if let Some(d) = DAYS.get((days % 7) as usize) {
        out[..3].copy_from_slice(*d);
    }
    two(day as u64, &mut out[5..7]);
    if let Some(m) = usize::try_from(month - 1).ok().and_then(|m| MONTHS.get(m)) {
        out[8..11].copy_from_slice(*m);
    }
    let y = year.clamp(0, 9999) as u64;
    two(y / 100, &mut out[12..14]);
    two(y % 100, &mut out[14..16]);
    two(rem / 3600, &mut out[17..19]);
    two(rem / 60 % 60, &mut out[20..22]);
    two(rem % 60, &mut out[23..25]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_follow_imf_fixdate() {
        assert_eq!(&imf_fixdate(784_111_777), b"Sun, 06 Nov 1994 08:49:37 GMT");
        assert_eq!(&imf_fixdate(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&imf_fixdate(1_709_208_000), b"Thu, 29 Feb 2024 12:00:00 GMT");
        assert_eq!(&imf_fixdate(4_102_444_799), b"Thu, 31 Dec 2099 23:59:59 GMT");
    }

    #[test]
    fn rfc3339_round_trip() {
        let t = Timestamp::parse_rfc3339("2030-01-31T12:00:00.250Z").unwrap();
        assert_eq!(t.as_millis(), 1_896_091_200_250);
        assert_eq!(Timestamp::parse_rfc3339(&t.to_rfc3339()), Some(t));
        assert!(Timestamp::parse_rfc3339("yesterday").is_none());
    }

    #[test]
    fn manual_clock_moves_only_when_told() {
        let c = ManualClock::new(Timestamp::from_millis(1000));
        assert_eq!(c.now().as_millis(), 1000);
        c.advance_seconds(5);
        assert_eq!(c.now().as_millis(), 6000);
    }
}

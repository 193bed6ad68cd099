//! Usage for billing (issue 17): a plan's prices and the statement of one app for one calendar
//! month, built from the exact usage the gateway counted. keygate processes no payment; the
//! statement is what a billing system is fed (docs/api.md, "Statements").
//!
//! Money is kept in millionths of the currency's unit (`micros`), so sums are exact integers;
//! prices are given and shown as decimals.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The most a price may be, in the currency's unit (a billion).
pub const MAX_PRICE: f64 = 1e9;
/// The most requests a flat fee may include.
pub const MAX_INCLUDED_REQUESTS: u64 = 1_000_000_000_000_000;

/// A plan's prices, all optional: a flat fee per period, requests included in it, and a price
/// per request beyond them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pricing {
    /// ISO 4217 code, such as `USD` or `EUR`.
    pub currency: String,
    /// Charged once per period, in micros.
    pub flat_micros: u64,
    /// Billable requests the flat fee covers.
    pub included_requests: u64,
    /// Charged per billable request beyond the included ones, in micros.
    pub per_request_micros: u64,
}

impl Pricing {
    /// Builds prices from decimal amounts, refusing what cannot be one.
    pub fn new(currency: &str, flat_fee: f64, included_requests: u64, price_per_request: f64) -> Result<Self> {
        if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(Error::invalid(
                "invalid_pricing",
                "currency is an ISO 4217 code of three capital letters, such as USD",
            ));
        }
        let micros = |v: f64, what: &str| {
            if !v.is_finite() || !(0.0..=MAX_PRICE).contains(&v) {
                return Err(Error::invalid("invalid_pricing", format!("{what} is an amount from 0 to 1000000000")));
            }
            Ok((v * 1e6).round() as u64)
        };
        if included_requests > MAX_INCLUDED_REQUESTS {
            return Err(Error::invalid("invalid_pricing", "included_requests is at most 10^15"));
        }
        Ok(Self {
            currency: currency.to_owned(),
            flat_micros: micros(flat_fee, "flat_fee")?,
            included_requests,
            per_request_micros: micros(price_per_request, "price_per_request")?,
        })
    }
}

/// One line of a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub item: String,
    pub quantity: u64,
    pub unit_price_micros: u64,
    pub amount_micros: u64,
}

/// The lines and total of `billable` requests in one period under `pricing`.
pub fn charge(pricing: &Pricing, billable: u64) -> (Vec<Line>, u64) {
    let mut lines = Vec::new();
    if pricing.flat_micros > 0 || pricing.included_requests > 0 {
        let item = if pricing.included_requests > 0 {
            format!("flat fee, {} requests included", pricing.included_requests)
        } else {
            "flat fee".to_owned()
        };
        lines.push(Line {
            item,
            quantity: 1,
            unit_price_micros: pricing.flat_micros,
            amount_micros: pricing.flat_micros,
        });
    }
    let over = billable.saturating_sub(pricing.included_requests);
    if pricing.per_request_micros > 0 {
        let item = if pricing.included_requests > 0 {
            format!("requests over {}", pricing.included_requests)
        } else {
            "requests".to_owned()
        };
        lines.push(Line {
            item,
            quantity: over,
            unit_price_micros: pricing.per_request_micros,
            amount_micros: over.saturating_mul(pricing.per_request_micros),
        });
    }
    let total = lines.iter().fold(0u64, |t, l| t.saturating_add(l.amount_micros));
    (lines, total)
}

/// A statement: what one app used in one calendar month and what it is charged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Statement {
    pub app_id: String,
    pub app_name: String,
    pub plan_id: Option<String>,
    pub plan_name: Option<String>,
    /// `YYYY-MM`.
    pub period: String,
    /// The period's start and end (exclusive), RFC 3339.
    pub from: String,
    pub to: String,
    /// Closed (`billing.period_closed` recorded, priced as it was then) or still open (priced by
    /// the plan as it is, from the usage counted so far).
    pub closed: bool,
    /// The currency of the prices (none when the plan is not priced).
    pub currency: Option<String>,
    /// Every request the gateway counted for the app's tokens.
    pub requests: u64,
    /// The requests charged: answered 2xx or 3xx.
    pub billable_requests: u64,
    /// Answered 4xx (refusals included) and 5xx: counted, not charged.
    pub client_errors: u64,
    pub server_errors: u64,
    pub lines: Vec<StatementLine>,
    pub total: String,
    pub total_micros: u64,
    /// The usage per token and per route the totals add up from.
    pub tokens: Vec<UsageLine>,
    pub routes: Vec<UsageLine>,
}

/// A charged line, its amounts as decimals and in micros.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatementLine {
    pub item: String,
    pub quantity: u64,
    pub unit_price: String,
    pub amount: String,
    pub unit_price_micros: u64,
    pub amount_micros: u64,
}

impl From<&Line> for StatementLine {
    fn from(l: &Line) -> Self {
        Self {
            item: l.item.clone(),
            quantity: l.quantity,
            unit_price: decimal(l.unit_price_micros),
            amount: decimal(l.amount_micros),
            unit_price_micros: l.unit_price_micros,
            amount_micros: l.amount_micros,
        }
    }
}

/// The requests of one token or route in a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UsageLine {
    /// A token id or a route id.
    pub id: String,
    pub requests: u64,
    pub billable_requests: u64,
}

impl Statement {
    /// The statement as CSV: one row per charged line, then the total (RFC 4180).
    pub fn csv_rows(&self) -> Vec<[String; 6]> {
        let currency = self.currency.clone().unwrap_or_default();
        let mut rows: Vec<[String; 6]> = self
            .lines
            .iter()
            .map(|l| {
                [
                    self.period.clone(),
                    l.item.clone(),
                    l.quantity.to_string(),
                    l.unit_price.clone(),
                    l.amount.clone(),
                    currency.clone(),
                ]
            })
            .collect();
        rows.push([self.period.clone(), "total".into(), String::new(), String::new(), self.total.clone(), currency]);
        rows
    }
}

/// Micros as a decimal with at least two places, trailing zeros beyond them left out
/// (`49500000` → `49.50`, `500` → `0.0005`).
pub fn decimal(micros: u64) -> String {
    let (units, frac) = (micros / 1_000_000, micros % 1_000_000);
    let mut f = format!("{frac:06}");
    while f.len() > 2 && f.ends_with('0') {
        f.pop();
    }
    format!("{units}.{f}")
}

/// A calendar month `YYYY-MM` as [start, end) in milliseconds, UTC.
pub fn month(period: &str) -> Result<(i64, i64)> {
    let bad = || Error::invalid("invalid_period", "period is a calendar month as YYYY-MM, such as 2026-11");
    let (y, m) = period.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 {
        return Err(bad());
    }
    let (y, m): (i64, u32) = (y.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) {
        return Err(bad());
    }
    let start_of = |y: i64, m: u32| crate::Timestamp::parse_rfc3339(&format!("{y:04}-{m:02}-01T00:00:00Z"));
    let start = start_of(y, m).ok_or_else(bad)?;
    let end = if m == 12 { start_of(y + 1, 1) } else { start_of(y, m + 1) }.ok_or_else(bad)?;
    Ok((start.as_millis(), end.as_millis()))
}

/// The `YYYY-MM` of the month holding `ms`.
pub fn month_of(ms: i64) -> String {
    crate::Timestamp::from_millis(ms).to_rfc3339().get(..7).unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_statement_adds_the_flat_fee_and_the_requests_over_the_included() {
        let p = Pricing::new("USD", 49.0, 100_000, 0.0005).unwrap();
        let (lines, total) = charge(&p, 102_345);
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[1].quantity, 2_345);
        assert_eq!(lines[1].amount_micros, 2_345 * 500);
        assert_eq!(total, 49_000_000 + 1_172_500);
        assert_eq!(decimal(total), "50.1725");
        let (_, under) = charge(&p, 10);
        assert_eq!(under, 49_000_000, "within the included requests: the flat fee only");
        let per_use = Pricing::new("EUR", 0.0, 0, 0.01).unwrap();
        let (lines, total) = charge(&per_use, 7);
        assert_eq!((lines.len(), total), (1, 70_000));
        assert_eq!(decimal(0), "0.00");
        assert_eq!(decimal(49_500_000), "49.50");
    }

    #[test]
    fn prices_and_periods_are_checked() {
        for (c, f, r) in
            [("usd", 1.0, 0.0), ("US", 1.0, 0.0), ("USD", -1.0, 0.0), ("USD", f64::NAN, 0.0), ("USD", 0.0, 2e9)]
        {
            assert_eq!(Pricing::new(c, f, 0, r).unwrap_err().code, "invalid_pricing", "{c} {f} {r}");
        }
        let (start, end) = month("2026-12").unwrap();
        assert_eq!(crate::Timestamp::from_millis(start).to_rfc3339(), "2026-12-01T00:00:00Z");
        assert_eq!(crate::Timestamp::from_millis(end).to_rfc3339(), "2027-01-01T00:00:00Z");
        assert_eq!(month_of(start), "2026-12");
        for bad in ["2026-13", "2026-1", "26-01", "2026/01", "", "2026-00", "abcd-ef"] {
            assert!(month(bad).is_err(), "{bad}");
        }
    }
}

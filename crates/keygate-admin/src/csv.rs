//! CSV for the exports (the audit trail's, in the API and the dashboard): RFC 4180 fields.

/// One CSV field: always quoted (a quote doubled), and a field a spreadsheet would run as a
/// formula (`=`, `+`, `-`, `@`, a tab or a carriage return at its start) gets a `'` first (CSV
/// injection).
pub(crate) fn field(s: &str) -> String {
    let s = if s.starts_with(['=', '+', '-', '@', '\t', '\r']) { format!("'{s}") } else { s.to_owned() };
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A statement as CSV: a header, one row per charged line, then the total.
pub(crate) fn statement(s: &keygate_core::billing::Statement) -> String {
    let mut out = String::from("period,item,quantity,unit_price,amount,currency\r\n");
    for row in s.csv_rows() {
        out.push_str(&row.iter().map(|c| field(c)).collect::<Vec<_>>().join(","));
        out.push_str("\r\n");
    }
    out
}

/// An access review as CSV: a header, then one row per token.
pub(crate) fn access_review(rows: &[crate::service::AccessReviewRow]) -> String {
    let mut out = String::from(crate::service::AccessReviewRow::CSV_HEADER);
    for r in rows {
        out.push_str(&r.csv_line());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::field;

    #[test]
    fn fields_are_quoted_and_formulas_defused() {
        assert_eq!(field("plain"), "\"plain\"");
        assert_eq!(field("a,b"), "\"a,b\"");
        assert_eq!(field("say \"hi\""), "\"say \"\"hi\"\"\"");
        assert_eq!(field("two\nlines"), "\"two\nlines\"");
        assert_eq!(field("=1+1"), "\"'=1+1\"");
        assert_eq!(field("@SUM(A1)"), "\"'@SUM(A1)\"");
        assert_eq!(field("-2"), "\"'-2\"");
        assert_eq!(field(""), "\"\"");
    }
}

//! The `/v1/route` query string (sans-IO), parsed in place: values are borrowed from the request
//! unless they are percent- or `+`-encoded. The rules are those of the typed extractor it
//! replaces: the six known parameters, each at most once, anything else refused.

use std::borrow::Cow;

/// A parsed `/v1/route` query.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct RouteQuery<'a> {
    /// `room=`: the room id.
    pub room: Option<Cow<'a, str>>,
    /// `region=`: a region to route to (dev mode only).
    pub region: Option<Cow<'a, str>>,
    /// `ip=`: the client address to place (dev mode only).
    pub ip: Option<Cow<'a, str>>,
    /// `role=`: listener, speaker or host.
    pub role: Option<Cow<'a, str>>,
    /// `avoid=`: comma-separated edge ids the client could not reach.
    pub avoid: Option<Cow<'a, str>>,
    /// `explain=`: `1` or `true` to have the answer say why (`why`).
    pub explain: Option<Cow<'a, str>>,
}

/// Why a query string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    /// A parameter other than the six known ones.
    #[error("unknown parameter")]
    Unknown,
    /// A parameter given twice.
    #[error("duplicate parameter")]
    Duplicate,
}

/// Parse `query` (without the `?`; `None` when the URL has none).
pub fn parse(query: Option<&str>) -> Result<RouteQuery<'_>, QueryError> {
    let query = query.unwrap_or("");
    // Nothing encoded (the usual query): split in place, as `form_urlencoded` splits
    // (`&`-separated, empty pieces skipped, the value after the first `=`, else empty), without
    // its decoding pass over each piece.
    if !query.bytes().any(|b| b == b'%' || b == b'+') {
        return parse_pairs(plain_pairs(query));
    }
    parse_pairs(form_urlencoded::parse(query.as_bytes()))
}

/// The `(key, value)` pairs of an unencoded query, split in one pass over its bytes.
fn plain_pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    let mut rest = query;
    std::iter::from_fn(move || loop {
        if rest.is_empty() {
            return None;
        }
        let end = rest.bytes().position(|b| b == b'&').unwrap_or(rest.len());
        let pair = &rest[..end];
        rest = rest.get(end + 1..).unwrap_or("");
        if pair.is_empty() {
            continue;
        }
        let (key, value) = match pair.bytes().position(|b| b == b'=') {
            Some(eq) => (&pair[..eq], &pair[eq + 1..]),
            None => (pair, ""),
        };
        return Some((Cow::Borrowed(key), Cow::Borrowed(value)));
    })
}

/// A query from its decoded `(key, value)` pairs.
fn parse_pairs<'a>(
    pairs: impl Iterator<Item = (Cow<'a, str>, Cow<'a, str>)>,
) -> Result<RouteQuery<'a>, QueryError> {
    let mut q = RouteQuery::default();
    for (key, value) in pairs {
        let slot = match &*key {
            "room" => &mut q.room,
            "region" => &mut q.region,
            "ip" => &mut q.ip,
            "role" => &mut q.role,
            "avoid" => &mut q.avoid,
            "explain" => &mut q.explain,
            _ => return Err(QueryError::Unknown),
        };
        if slot.is_some() {
            return Err(QueryError::Duplicate);
        }
        *slot = Some(value);
    }
    Ok(q)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_parameters_are_borrowed_unless_encoded() {
        let q = parse(Some(
            "room=00ab&ip=8.8.8.8&role=listener&avoid=e%2C1&region=eu+west",
        ))
        .unwrap();
        assert!(matches!(q.room, Some(Cow::Borrowed("00ab"))));
        assert!(matches!(q.ip, Some(Cow::Borrowed("8.8.8.8"))));
        assert!(matches!(q.role, Some(Cow::Borrowed("listener"))));
        assert_eq!(q.avoid.as_deref(), Some("e,1"));
        assert_eq!(q.region.as_deref(), Some("eu west"));
        assert_eq!(parse(None).unwrap(), RouteQuery::default());
        assert_eq!(parse(Some("")).unwrap(), RouteQuery::default());
        // A key without a value is an empty value, as the extractor had it.
        assert_eq!(parse(Some("room")).unwrap().room.as_deref(), Some(""));
    }

    #[test]
    fn unknown_and_repeated_parameters_are_refused() {
        assert_eq!(parse(Some("room=1&token=x")), Err(QueryError::Unknown));
        assert_eq!(parse(Some("room=1&room=2")), Err(QueryError::Duplicate));
        assert_eq!(parse(Some("%72oom=1&room=2")), Err(QueryError::Duplicate));
        // Not valid UTF-8 once decoded: replaced, never a panic.
        assert!(parse(Some("room=%ff%fe")).is_ok());
    }

    #[test]
    fn an_unencoded_query_is_split_as_form_urlencoded_splits_it() {
        for query in [
            "room=00ab&role=listener",
            "&&room=00ab&&ip=8.8.8.8&",
            "room&role=",
            "room==x=y&avoid=a,b",
            "region=eu-west&ip=::1&room=00ab",
            "room=1&room=2",
            "room=1&token=x",
            "=x",
            "é=1&room=ü",
        ] {
            let slow = parse_pairs(form_urlencoded::parse(query.as_bytes()));
            assert_eq!(parse(Some(query)), slow, "{query}");
        }
    }
}

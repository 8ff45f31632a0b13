//! Sans-IO conformance checks for the playlists the packager emits, against rfc8216bis
//! (LL-HLS) and Apple's HLS authoring specification §14 (low-latency). Used by the unit tests
//! and, on every playlist they fetch, by the end-to-end tests.
//!
//! The checker parses the text itself (independently of the writer and of m3u8-rs) and returns
//! either a summary of what the playlist names (so a test can fetch every object) or the list
//! of every rule broken.

use amphi_packager::playlist::{Naming, INIT_NAME, PARTS_PER_SEGMENT};
use std::collections::{HashMap, HashSet};

/// What kind of media playlist is expected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A live LL-HLS playlist (preload hint, no `EXT-X-ENDLIST`).
    Live,
    /// A live playlist after the room ended (`EXT-X-ENDLIST`, no preload hint).
    Ended,
    /// Live or ended: whatever the playlist says, checked by the matching rules.
    Any,
    /// The recording (`EXT-X-PLAYLIST-TYPE:VOD`).
    Vod,
}

/// Expectations the checker cannot read from the playlist itself.
#[derive(Clone, Copy, Debug)]
pub struct Expect {
    /// Kind of playlist.
    pub kind: Kind,
    /// The rendition's `PART-TARGET` in milliseconds (`Rendition::part_target_ms`), for live
    /// playlists.
    pub part_target_ms: Option<u32>,
    /// Number of sibling renditions that must have an `EXT-X-RENDITION-REPORT` (live only).
    pub reports: usize,
}

impl Expect {
    /// A live playlist of a rendition with parts of `part_target_ms`, without siblings.
    pub fn live(part_target_ms: u32) -> Self {
        Expect {
            kind: Kind::Live,
            part_target_ms: Some(part_target_ms),
            reports: 0,
        }
    }
    /// A live playlist that ended.
    pub fn ended(part_target_ms: u32) -> Self {
        Expect {
            kind: Kind::Ended,
            ..Self::live(part_target_ms)
        }
    }
    /// A live playlist, ended or not.
    pub fn any(part_target_ms: u32) -> Self {
        Expect {
            kind: Kind::Any,
            ..Self::live(part_target_ms)
        }
    }
    /// A VOD recording.
    pub fn vod() -> Self {
        Expect {
            kind: Kind::Vod,
            part_target_ms: None,
            reports: 0,
        }
    }
    /// With `n` sibling rendition reports.
    pub fn with_reports(mut self, n: usize) -> Self {
        self.reports = n;
        self
    }
}

/// A segment named by a playlist.
#[derive(Clone, Debug, PartialEq)]
pub struct ListedSegment {
    /// Media sequence number.
    pub msn: u64,
    /// URI as written.
    pub uri: String,
    /// `EXTINF` duration in seconds.
    pub duration: f64,
    /// Listed with `EXT-X-GAP` (no media).
    pub gap: bool,
}

/// What a conforming media playlist names.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MediaSummary {
    /// `EXT-X-MEDIA-SEQUENCE`.
    pub media_sequence: u64,
    /// `EXT-X-MAP` URI.
    pub map: String,
    /// Complete segments listed.
    pub segments: Vec<ListedSegment>,
    /// Parts listed: `(msn, index, uri)`.
    pub parts: Vec<(u64, u32, String)>,
    /// `EXT-X-PRELOAD-HINT` URI.
    pub preload_hint: Option<String>,
    /// `EXT-X-ENDLIST` present.
    pub ended: bool,
    /// Segments skipped by a delta update.
    pub skipped: u64,
    /// Rendition reports: `(uri, last msn, last part)`.
    pub reports: Vec<(String, Option<u64>, Option<u32>)>,
    /// `EXT-X-DATERANGE` ids.
    pub dateranges: Vec<String>,
    /// Media sequence numbers of the segments (or trailing parts) after an
    /// `EXT-X-DISCONTINUITY`.
    pub discontinuities: Vec<u64>,
}

/// Split an attribute list (`A=1,B="x,y",C=Z`) into pairs; `None` if malformed.
pub fn attributes(list: &str) -> Option<HashMap<String, String>> {
    let mut out = HashMap::new();
    let mut rest = list;
    while !rest.is_empty() {
        let (key, after) = rest.split_once('=')?;
        if key.is_empty()
            || !key
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-')
        {
            return None;
        }
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            let v = &q[..end];
            let next = &q[end + 1..];
            (v.to_string(), next)
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        if out.insert(key.to_string(), value).is_some() {
            return None;
        }
        rest = match next.strip_prefix(',') {
            Some(r) => r,
            None if next.is_empty() => next,
            None => return None,
        };
    }
    Some(out)
}

fn num(v: Option<&String>) -> Option<f64> {
    v.and_then(|s| s.parse::<f64>().ok())
        .filter(|f| f.is_finite())
}

fn parse_pdt(s: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok()
}

/// A segment is `seg{msn}.m4a` (or `.m4s`: a segment of an older recording kept its name).
fn seg_msn(uri: &str) -> Option<u64> {
    let (stem, ext) = uri.rsplit_once('.')?;
    Naming::from_media_ext(ext)?;
    stem.strip_prefix("seg")?.parse().ok()
}

/// Parts are always `part{msn}.{i}.m4a`: an audio extension tells players that see only the
/// media playlist what it holds.
fn part_id(uri: &str) -> Option<(u64, u32)> {
    let (m, p) = uri
        .strip_prefix("part")?
        .strip_suffix(".m4a")?
        .split_once('.')?;
    Some((m.parse().ok()?, p.parse().ok()?))
}

/// Check a media playlist. `Ok` carries what it names; `Err` lists every rule broken.
pub fn check_media(text: &str, expect: &Expect) -> Result<MediaSummary, Vec<String>> {
    let mut errs: Vec<String> = Vec::new();
    let mut sum = MediaSummary::default();
    let mut lines = text.lines();
    if lines.next() != Some("#EXTM3U") {
        errs.push("first line must be #EXTM3U".into());
    }
    if !text.ends_with('\n') {
        errs.push("playlist must end with a newline".into());
    }
    let mut version = None;
    let mut target: Option<f64> = None;
    let mut server_control: Option<HashMap<String, String>> = None;
    let mut part_target: Option<f64> = None;
    let mut media_sequence: Option<u64> = None;
    let mut playlist_type = None;
    let mut disc_seq_seen = false;
    let mut seen_segment_or_part = false;
    // State of the segment being read.
    let mut pending_inf: Option<f64> = None;
    let mut pending_pdt: Option<time::OffsetDateTime> = None;
    let mut pending_disc = false;
    let mut pending_gap = false;
    let mut pending_parts: Vec<(f64, String)> = Vec::new();
    let mut next_msn: Option<u64> = None;
    let mut last_seg: Option<(time::OffsetDateTime, f64)> = None;
    let mut ids = HashSet::new();
    let mut endlist_line = None;
    let mut line_no = 1usize;
    let mut last_line = 0usize;
    let mut segments_with_parts = Vec::new();
    for line in lines {
        line_no += 1;
        if line.is_empty() {
            continue;
        }
        last_line = line_no;
        let (tag, value) = match line.split_once(':') {
            Some((t, v)) if line.starts_with('#') => (t, v),
            _ => (line, ""),
        };
        match tag {
            "#EXT-X-VERSION" => {
                if version.replace(value.parse::<u32>().unwrap_or(0)).is_some() {
                    errs.push("EXT-X-VERSION given twice".into());
                }
            }
            "#EXT-X-TARGETDURATION" => match value.parse::<u32>() {
                Ok(v) => target = Some(f64::from(v)),
                Err(_) => errs.push(format!("bad EXT-X-TARGETDURATION {value}")),
            },
            "#EXT-X-SERVER-CONTROL" => match attributes(value) {
                Some(a) => server_control = Some(a),
                None => errs.push("bad EXT-X-SERVER-CONTROL attributes".into()),
            },
            "#EXT-X-PART-INF" => {
                part_target = attributes(value).and_then(|a| num(a.get("PART-TARGET")));
                if part_target.is_none() {
                    errs.push("EXT-X-PART-INF without a PART-TARGET".into());
                }
            }
            "#EXT-X-MEDIA-SEQUENCE" => match value.parse::<u64>() {
                Ok(v) if !seen_segment_or_part => {
                    media_sequence = Some(v);
                    next_msn = Some(v);
                }
                _ => errs.push(format!("bad or late EXT-X-MEDIA-SEQUENCE {value}")),
            },
            "#EXT-X-DISCONTINUITY-SEQUENCE" => {
                if seen_segment_or_part || disc_seq_seen || value.parse::<u64>().is_err() {
                    errs.push("bad EXT-X-DISCONTINUITY-SEQUENCE".into());
                }
                disc_seq_seen = true;
            }
            "#EXT-X-PLAYLIST-TYPE" => playlist_type = Some(value.to_string()),
            "#EXT-X-INDEPENDENT-SEGMENTS" => {}
            "#EXT-X-MAP" => match attributes(value).and_then(|a| a.get("URI").cloned()) {
                Some(u) if !seen_segment_or_part => {
                    if u != INIT_NAME {
                        errs.push(format!("EXT-X-MAP {u} is not {INIT_NAME}"));
                    }
                    sum.map = u
                }
                _ => errs.push("EXT-X-MAP must have a URI and precede the segments".into()),
            },
            "#EXT-X-SKIP" => {
                let n = attributes(value).and_then(|a| {
                    a.get("SKIPPED-SEGMENTS")
                        .and_then(|v| v.parse::<u64>().ok())
                });
                match (n, next_msn) {
                    (Some(n), Some(m)) if !seen_segment_or_part && n > 0 => {
                        sum.skipped = n;
                        next_msn = Some(m + n);
                    }
                    _ => errs.push("bad EXT-X-SKIP".into()),
                }
                if server_control
                    .as_ref()
                    .is_none_or(|s| !s.contains_key("CAN-SKIP-UNTIL"))
                {
                    errs.push("EXT-X-SKIP without CAN-SKIP-UNTIL".into());
                }
            }
            "#EXT-X-DISCONTINUITY" => pending_disc = true,
            "#EXT-X-GAP" => pending_gap = true,
            "#EXT-X-PROGRAM-DATE-TIME" => match parse_pdt(value) {
                Some(t) => pending_pdt = Some(t),
                None => errs.push(format!("bad EXT-X-PROGRAM-DATE-TIME {value}")),
            },
            "#EXT-X-DATERANGE" => match attributes(value) {
                Some(a) => {
                    let id = a.get("ID").cloned().unwrap_or_default();
                    if id.is_empty() || !ids.insert(id.clone()) {
                        errs.push(format!("EXT-X-DATERANGE needs a unique ID ({id})"));
                    }
                    if a.get("START-DATE").and_then(|d| parse_pdt(d)).is_none() {
                        errs.push(format!("EXT-X-DATERANGE {id} needs a START-DATE"));
                    }
                    if a.contains_key("DURATION") && num(a.get("DURATION")).is_none_or(|d| d < 0.0)
                    {
                        errs.push(format!("EXT-X-DATERANGE {id} has a bad DURATION"));
                    }
                    sum.dateranges.push(id);
                }
                None => errs.push("bad EXT-X-DATERANGE attributes".into()),
            },
            "#EXT-X-PART" => {
                seen_segment_or_part = true;
                let Some(a) = attributes(value) else {
                    errs.push("bad EXT-X-PART attributes".into());
                    continue;
                };
                let d = num(a.get("DURATION"));
                let uri = a.get("URI").cloned().unwrap_or_default();
                if d.is_none() || uri.is_empty() {
                    errs.push(format!("EXT-X-PART needs DURATION and URI ({value})"));
                }
                if a.get("INDEPENDENT").map(String::as_str) != Some("YES") {
                    errs.push(format!("audio part {uri} must be INDEPENDENT=YES"));
                }
                pending_parts.push((d.unwrap_or(0.0), uri));
            }
            "#EXTINF" => {
                seen_segment_or_part = true;
                let d = value.split(',').next().and_then(|v| v.parse::<f64>().ok());
                match d {
                    Some(d) if d > 0.0 => pending_inf = Some(d),
                    _ => errs.push(format!("bad EXTINF {value}")),
                }
            }
            "#EXT-X-PRELOAD-HINT" => {
                let a = attributes(value).unwrap_or_default();
                if a.get("TYPE").map(String::as_str) != Some("PART") {
                    errs.push("EXT-X-PRELOAD-HINT must be TYPE=PART".into());
                }
                if sum
                    .preload_hint
                    .replace(a.get("URI").cloned().unwrap_or_default())
                    .is_some()
                {
                    errs.push("more than one EXT-X-PRELOAD-HINT".into());
                }
            }
            "#EXT-X-RENDITION-REPORT" => {
                let a = attributes(value).unwrap_or_default();
                let uri = a.get("URI").cloned().unwrap_or_default();
                if uri.is_empty() {
                    errs.push("EXT-X-RENDITION-REPORT needs a URI".into());
                }
                let msn = a.get("LAST-MSN").and_then(|v| v.parse().ok());
                let part = a.get("LAST-PART").and_then(|v| v.parse().ok());
                if msn.is_some() != part.is_some() {
                    errs.push(format!(
                        "rendition report {uri}: LAST-MSN and LAST-PART go together"
                    ));
                }
                sum.reports.push((uri, msn, part));
            }
            "#EXT-X-ENDLIST" => {
                sum.ended = true;
                endlist_line = Some(line_no);
            }
            t if t.starts_with('#') => errs.push(format!("unexpected tag {t}")),
            uri => {
                // A segment URI closes the segment being read.
                let Some(d) = pending_inf.take() else {
                    errs.push(format!("URI {uri} without EXTINF"));
                    continue;
                };
                let msn = next_msn.unwrap_or(0);
                if seg_msn(uri) != Some(msn) {
                    errs.push(format!("segment {uri} is not seg{msn}.m4a"));
                }
                let gap = std::mem::take(&mut pending_gap);
                if gap && !pending_parts.is_empty() {
                    errs.push(format!("gap segment {uri} lists parts"));
                }
                if pending_disc {
                    sum.discontinuities.push(msn);
                }
                check_segment(
                    &mut errs,
                    &mut sum,
                    msn,
                    &mut pending_parts,
                    part_target,
                    pending_pdt.take(),
                    std::mem::take(&mut pending_disc),
                    &mut last_seg,
                    Some(d),
                );
                if !sum.parts.is_empty() && sum.parts.last().is_some_and(|p| p.0 == msn) {
                    segments_with_parts.push(msn);
                }
                sum.segments.push(ListedSegment {
                    msn,
                    uri: uri.to_string(),
                    duration: d,
                    gap,
                });
                next_msn = Some(msn + 1);
            }
        }
    }
    // Trailing parts of the segment in progress.
    if !pending_parts.is_empty() {
        let msn = next_msn.unwrap_or(0);
        if pending_disc {
            sum.discontinuities.push(msn);
        }
        check_segment(
            &mut errs,
            &mut sum,
            msn,
            &mut pending_parts,
            part_target,
            pending_pdt.take(),
            pending_disc,
            &mut last_seg,
            None,
        );
        segments_with_parts.push(msn);
    }
    if pending_inf.is_some() {
        errs.push("EXTINF without a URI".into());
    }
    if pending_gap {
        errs.push("EXT-X-GAP without a segment".into());
    }
    let Some(target) = target else {
        errs.push("EXT-X-TARGETDURATION missing".into());
        return Err(errs);
    };
    if version.is_none() {
        errs.push("EXT-X-VERSION missing".into());
    }
    if sum.map.is_empty() {
        errs.push("EXT-X-MAP missing".into());
    }
    sum.media_sequence = media_sequence.unwrap_or(0);
    for s in &sum.segments {
        if s.duration.round() > target {
            errs.push(format!(
                "EXTINF {} of {} exceeds the target duration",
                s.duration, s.uri
            ));
        }
    }
    if let Some(line) = endlist_line {
        if line != last_line {
            errs.push("EXT-X-ENDLIST must be the last tag".into());
        }
    }
    let kind = match expect.kind {
        Kind::Any if sum.ended => Kind::Ended,
        Kind::Any => Kind::Live,
        k => k,
    };
    match kind {
        Kind::Vod => {
            if playlist_type.as_deref() != Some("VOD") {
                errs.push("VOD playlist without EXT-X-PLAYLIST-TYPE:VOD".into());
            }
            if !sum.ended {
                errs.push("VOD playlist without EXT-X-ENDLIST".into());
            }
            if !sum.parts.is_empty() || sum.preload_hint.is_some() {
                errs.push("VOD playlist lists parts or a preload hint".into());
            }
            if sum.segments.is_empty() {
                errs.push("VOD playlist lists no segment".into());
            }
        }
        Kind::Live | Kind::Ended | Kind::Any => {
            if playlist_type.is_some() {
                errs.push("live playlist with EXT-X-PLAYLIST-TYPE".into());
            }
            check_server_control(&mut errs, server_control.as_ref(), target, part_target);
            if let (Some(ms), Some(pt)) = (expect.part_target_ms, part_target) {
                if (pt - f64::from(ms) / 1000.0).abs() > 1e-9 {
                    errs.push(format!("PART-TARGET {pt} is not the rendition's"));
                }
            }
            // Parts only for the most recent segments (the live edge).
            if let Some(&first) = segments_with_parts.first() {
                let last = sum.segments.last().map_or(first, |s| s.msn.max(first));
                if last.saturating_sub(first) > 3 {
                    errs.push(format!(
                        "parts listed for segment {first}, far from the edge"
                    ));
                }
            }
            if kind == Kind::Live {
                if sum.ended {
                    errs.push("live playlist has EXT-X-ENDLIST".into());
                }
                check_preload_hint(&mut errs, &sum, next_msn.unwrap_or(0));
                if sum.reports.len() != expect.reports {
                    errs.push(format!(
                        "{} rendition reports, expected {}",
                        sum.reports.len(),
                        expect.reports
                    ));
                }
            } else {
                if !sum.ended {
                    errs.push("ended playlist without EXT-X-ENDLIST".into());
                }
                if sum.preload_hint.is_some() {
                    errs.push("ended playlist with a preload hint".into());
                }
            }
            if sum.skipped > 0 {
                let listed: f64 = sum.segments.iter().map(|s| s.duration).sum();
                let until = server_control
                    .as_ref()
                    .and_then(|s| num(s.get("CAN-SKIP-UNTIL")))
                    .unwrap_or(f64::MAX);
                if listed + 1e-6 < until {
                    errs.push(format!(
                        "delta update skipped segments within CAN-SKIP-UNTIL ({listed} s listed)"
                    ));
                }
            }
        }
    }
    if errs.is_empty() {
        Ok(sum)
    } else {
        Err(errs)
    }
}

#[allow(clippy::too_many_arguments)]
fn check_segment(
    errs: &mut Vec<String>,
    sum: &mut MediaSummary,
    msn: u64,
    parts: &mut Vec<(f64, String)>,
    part_target: Option<f64>,
    pdt: Option<time::OffsetDateTime>,
    discontinuity: bool,
    last: &mut Option<(time::OffsetDateTime, f64)>,
    duration: Option<f64>,
) {
    if !parts.is_empty() {
        let Some(pt) = part_target else {
            errs.push("EXT-X-PART without EXT-X-PART-INF".into());
            parts.clear();
            return;
        };
        if parts.len() as u32 > PARTS_PER_SEGMENT {
            errs.push(format!("segment {msn} has {} parts", parts.len()));
        }
        let n = parts.len();
        let mut total = 0.0;
        for (i, (d, uri)) in parts.drain(..).enumerate() {
            total += d;
            if part_id(&uri) != Some((msn, i as u32)) {
                errs.push(format!("part {uri} is not part{msn}.{i}.m4a"));
            }
            if d > pt + 1e-9 {
                errs.push(format!("part {uri} ({d} s) exceeds PART-TARGET {pt}"));
            }
            // rfc8216bis 4.4.4.9: every part but the segment's last is >= 85% of PART-TARGET.
            let last_of_segment = i + 1 == n && duration.is_some();
            if !last_of_segment && i + 1 < n && d < 0.85 * pt - 1e-9 {
                errs.push(format!("part {uri} ({d} s) is under 85% of PART-TARGET"));
            }
            sum.parts.push((msn, i as u32, uri));
        }
        if let Some(d) = duration {
            if (total - d).abs() > 0.001 * n as f64 + 1e-9 {
                errs.push(format!(
                    "parts of segment {msn} sum to {total}, EXTINF says {d}"
                ));
            }
        }
    }
    let Some(pdt) = pdt else {
        errs.push(format!("segment {msn} has no EXT-X-PROGRAM-DATE-TIME"));
        return;
    };
    if let Some((prev, prev_d)) = *last {
        if !discontinuity {
            let gap = (pdt - prev).as_seconds_f64() - prev_d;
            if !(-0.002..=0.25).contains(&gap) {
                errs.push(format!(
                    "PROGRAM-DATE-TIME of segment {msn} is {gap:.3} s off the previous segment's end"
                ));
            }
        } else if pdt <= prev {
            errs.push(format!("PROGRAM-DATE-TIME goes backwards at segment {msn}"));
        }
    }
    *last = Some((pdt, duration.unwrap_or(0.0)));
}

fn check_server_control(
    errs: &mut Vec<String>,
    sc: Option<&HashMap<String, String>>,
    target: f64,
    part_target: Option<f64>,
) {
    let Some(sc) = sc else {
        errs.push("EXT-X-SERVER-CONTROL missing".into());
        return;
    };
    if sc.get("CAN-BLOCK-RELOAD").map(String::as_str) != Some("YES") {
        errs.push("CAN-BLOCK-RELOAD=YES missing".into());
    }
    let Some(pt) = part_target else {
        errs.push("EXT-X-PART-INF missing".into());
        return;
    };
    match num(sc.get("PART-HOLD-BACK")) {
        Some(v) if v + 1e-9 >= 3.0 * pt => {}
        v => errs.push(format!("PART-HOLD-BACK {v:?} < 3 x PART-TARGET {pt}")),
    }
    match num(sc.get("CAN-SKIP-UNTIL")) {
        Some(v) if v + 1e-9 >= 6.0 * target => {}
        v => errs.push(format!("CAN-SKIP-UNTIL {v:?} < 6 x TARGETDURATION")),
    }
    match num(sc.get("HOLD-BACK")) {
        Some(v) if v + 1e-9 >= 3.0 * target => {}
        v => errs.push(format!("HOLD-BACK {v:?} < 3 x TARGETDURATION")),
    }
}

fn check_preload_hint(errs: &mut Vec<String>, sum: &MediaSummary, next_msn: u64) {
    let Some(hint) = &sum.preload_hint else {
        errs.push("live playlist without EXT-X-PRELOAD-HINT".into());
        return;
    };
    let expected = match sum.parts.last() {
        Some(&(m, p, _)) if sum.segments.last().is_none_or(|s| s.msn < m) => {
            if p + 1 >= PARTS_PER_SEGMENT {
                (m + 1, 0)
            } else {
                (m, p + 1)
            }
        }
        _ => (next_msn, 0),
    };
    if part_id(hint) != Some(expected) {
        errs.push(format!(
            "preload hint {hint} is not the next part part{}.{}.m4a",
            expected.0, expected.1
        ));
    }
}

/// Check a multivariant playlist with `variants` audio variants. `Ok` carries the variant URIs.
pub fn check_multivariant(text: &str, variants: usize) -> Result<Vec<String>, Vec<String>> {
    let mut errs = Vec::new();
    let mut lines = text.lines();
    if lines.next() != Some("#EXTM3U") {
        errs.push("first line must be #EXTM3U".into());
    }
    let mut uris = Vec::new();
    let mut pending = false;
    for line in lines.filter(|l| !l.is_empty()) {
        if let Some(v) = line.strip_prefix("#EXT-X-STREAM-INF:") {
            let a = attributes(v).unwrap_or_default();
            if num(a.get("BANDWIDTH")).is_none_or(|b| b <= 0.0) {
                errs.push("EXT-X-STREAM-INF without BANDWIDTH".into());
            }
            match a.get("CODECS").map(String::as_str) {
                Some("opus") | Some("mp4a.40.2") => {}
                c => errs.push(format!(
                    "unexpected CODECS {c:?} (lowercase opus or mp4a.40.2)"
                )),
            }
            pending = true;
        } else if line.starts_with('#') {
            if !matches!(line, "#EXT-X-VERSION:9" | "#EXT-X-INDEPENDENT-SEGMENTS") {
                errs.push(format!("unexpected line {line}"));
            }
        } else if std::mem::take(&mut pending) {
            uris.push(line.to_string());
        } else {
            errs.push(format!("URI {line} without EXT-X-STREAM-INF"));
        }
    }
    if uris.len() != variants {
        errs.push(format!("{} variants, expected {variants}", uris.len()));
    }
    if errs.is_empty() {
        Ok(uris)
    } else {
        Err(errs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use amphi_packager::playlist::OPUS;

    const GOOD: &str = "#EXTM3U\n#EXT-X-VERSION:9\n#EXT-X-TARGETDURATION:2\n\
#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES,CAN-SKIP-UNTIL=12.000,PART-HOLD-BACK=0.600,HOLD-BACK=6.000\n\
#EXT-X-PART-INF:PART-TARGET=0.200\n#EXT-X-MEDIA-SEQUENCE:4\n#EXT-X-MAP:URI=\"init.m4a\"\n\
#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:20.250Z\n\
#EXT-X-PART:DURATION=0.200,URI=\"part4.0.m4a\",INDEPENDENT=YES\n\
#EXT-X-PART:DURATION=0.200,URI=\"part4.1.m4a\",INDEPENDENT=YES\n#EXTINF:0.400,\nseg4.m4a\n\
#EXT-X-PROGRAM-DATE-TIME:2023-11-14T22:13:20.650Z\n\
#EXT-X-PART:DURATION=0.200,URI=\"part5.0.m4a\",INDEPENDENT=YES\n\
#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part5.1.m4a\"\n";

    #[test]
    fn a_good_playlist_passes_and_is_summarized() {
        let s = check_media(GOOD, &Expect::live(OPUS.part_target_ms())).unwrap();
        assert_eq!(s.media_sequence, 4);
        assert_eq!(s.segments.len(), 1);
        assert_eq!(s.parts.len(), 3);
        assert_eq!(s.preload_hint.as_deref(), Some("part5.1.m4a"));
    }

    fn broken(from: &str, to: &str) -> Vec<String> {
        let text = GOOD.replacen(from, to, 1);
        assert_ne!(text, GOOD, "{from} not found");
        check_media(&text, &Expect::live(OPUS.part_target_ms())).unwrap_err()
    }

    #[test]
    fn each_rule_is_enforced() {
        let cases = [
            ("CAN-BLOCK-RELOAD=YES", "CAN-BLOCK-RELOAD=NO"),
            ("PART-HOLD-BACK=0.600", "PART-HOLD-BACK=0.500"),
            ("CAN-SKIP-UNTIL=12.000", "CAN-SKIP-UNTIL=6.000"),
            ("HOLD-BACK=6.000", "HOLD-BACK=4.000"),
            ("part5.1.m4a", "part5.2.m4a"),
            (",INDEPENDENT=YES\n#EXTINF", "\n#EXTINF"),
            (
                "DURATION=0.200,URI=\"part4.0",
                "DURATION=0.100,URI=\"part4.0",
            ),
            (
                "DURATION=0.200,URI=\"part5.0",
                "DURATION=0.250,URI=\"part5.0",
            ),
            ("seg4.m4a", "seg5.m4a"),
            ("seg4.m4a", "seg4.mp4"),
            ("part4.1.m4a", "part4.1.m4s"),
            ("URI=\"init.m4a\"", "URI=\"init.mp4\""),
            ("#EXTINF:0.400", "#EXTINF:2.600"),
            ("22:13:20.650Z", "22:13:21.650Z"),
            ("#EXT-X-MAP:URI=\"init.m4a\"\n", ""),
            ("#EXT-X-PART-INF:PART-TARGET=0.200\n", ""),
            ("#EXTM3U\n", "#EXTM3\n"),
            ("#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part5.1.m4a\"\n", ""),
            ("#EXT-X-VERSION:9\n", "#EXT-X-VERSION:9\n#EXT-X-BOGUS\n"),
        ];
        for (from, to) in cases {
            let errs = broken(from, to);
            assert!(!errs.is_empty(), "{from} -> {to} passed");
        }
        // Rendition reports are counted.
        assert!(check_media(GOOD, &Expect::live(OPUS.part_target_ms()).with_reports(1)).is_err());
        // Ended rules.
        let ended = GOOD.replace(
            "#EXT-X-PRELOAD-HINT:TYPE=PART,URI=\"part5.1.m4a\"\n",
            "#EXT-X-ENDLIST\n",
        );
        assert!(check_media(&ended, &Expect::live(OPUS.part_target_ms())).is_err());
        assert!(check_media(&ended, &Expect::any(OPUS.part_target_ms())).is_ok());
        assert!(check_media(GOOD, &Expect::ended(OPUS.part_target_ms())).is_err());
        assert!(check_media(&ended, &Expect::vod()).is_err());
    }

    #[test]
    fn attribute_lists_parse_strictly() {
        let a = attributes("A=1,B=\"x,y\",C-D=Z").unwrap();
        assert_eq!(a["B"], "x,y");
        assert_eq!(a["C-D"], "Z");
        for bad in ["A", "a=1", "A=1,A=2", "A=\"x", "A=\"x\"y", "=1"] {
            assert!(attributes(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn multivariant_rules() {
        let good = "#EXTM3U\n#EXT-X-VERSION:9\n#EXT-X-INDEPENDENT-SEGMENTS\n\
            #EXT-X-STREAM-INF:BANDWIDTH=96000,CODECS=\"opus\"\nopus/playlist.m3u8\n";
        assert_eq!(
            check_multivariant(good, 1).unwrap(),
            vec!["opus/playlist.m3u8"]
        );
        assert!(check_multivariant(&good.replace("opus\"", "Opus\""), 1).is_err());
        assert!(check_multivariant(good, 2).is_err());
        assert!(check_multivariant(&good.replace("BANDWIDTH=96000,", ""), 1).is_err());
    }
}

//! Parsing of HLS request paths and delivery directives (`_HLS_msn`, `_HLS_part`, `_HLS_skip`),
//! and the sans-IO blocking-reload decision (rfc8216bis section 6.2.5.2). Network-facing: never
//! panics, whatever the input (fuzzed under `fuzz/`).

use crate::playlist::{Naming, PlaylistStatus, PART_TARGET_MS};
use amphi_protocol::audio::PARTS_PER_SEGMENT;
use amphi_protocol::RoomId;
use std::str::FromStr;

/// Advance Part Limit: 3 / PART-TARGET when the part target is under a second (15 parts here).
pub const ADVANCE_PART_LIMIT: u64 = (3 * 1000 / PART_TARGET_MS) as u64;
/// A `_HLS_msn` more than this many segments after the last complete one is refused.
pub const MAX_MSN_AHEAD: u64 = 2;
/// Largest media sequence number accepted in a URL (about 10^4 years of 2 s segments).
pub const MAX_MSN: u64 = 1 << 40;

/// A rendition directory of a room.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RenditionId {
    /// `opus/`.
    Opus,
    /// `aac/`.
    Aac,
}

impl RenditionId {
    /// The directory name.
    pub fn dir(self) -> &'static str {
        match self {
            RenditionId::Opus => "opus",
            RenditionId::Aac => "aac",
        }
    }
}

/// A resource under `/hls/{room}/`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HlsResource {
    /// `index.m3u8`: the main multivariant playlist (one codec).
    Multivariant,
    /// `index-{rendition}.m3u8`: the multivariant playlist of one rendition.
    CodecMultivariant(RenditionId),
    /// `recording.m3u8`: the main multivariant playlist of the recording.
    Recording,
    /// `recording-{rendition}.m3u8`: the recording's multivariant playlist of one rendition.
    CodecRecording(RenditionId),
    /// `chapters.json`: the recording's Podcasting 2.0 chapters.
    ChaptersJson,
    /// `chapters.vtt`: the recording's WebVTT chapters.
    ChaptersVtt,
    /// `recording.m4a`: the published recording as one downloadable file (AAC-LC, chapters).
    RecordingM4a,
    /// `{rendition}/playlist.m3u8`.
    MediaPlaylist(RenditionId),
    /// `{rendition}/vod.m3u8`: the recording's media playlist.
    Vod(RenditionId),
    /// `{rendition}/init.m4a` (or `init.mp4`, [`Naming::Legacy`]).
    Init(RenditionId, Naming),
    /// `{rendition}/seg{msn}.m4a` (or `.m4s`).
    Segment(RenditionId, u64, Naming),
    /// `{rendition}/part{msn}.{part}.m4a` (or `.m4s`).
    Part(RenditionId, u64, u32, Naming),
}

impl HlsResource {
    /// Storage key of a media file (init, segment, part) of `room`: the name it was asked by.
    pub fn media_key(&self, room: RoomId) -> Option<String> {
        Some(match *self {
            HlsResource::Init(r, n) => format!("{room}/{}/{}", r.dir(), n.init()),
            HlsResource::Segment(r, msn, n) => format!("{room}/{}/{}", r.dir(), n.segment(msn)),
            HlsResource::Part(r, msn, part, n) => {
                format!("{room}/{}/{}", r.dir(), n.part(msn, part))
            }
            _ => return None,
        })
    }
}

/// A parsed `/hls/...` path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HlsPath {
    /// The room.
    pub room: RoomId,
    /// The file inside it.
    pub resource: HlsResource,
}

/// Why a path was refused (answered with 404).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PathError {
    /// Not under `/hls/`.
    #[error("not an HLS path")]
    NotHls,
    /// The room id is not 16 hex digits.
    #[error("bad room id")]
    BadRoom,
    /// Not a file the packager serves.
    #[error("unknown resource")]
    UnknownResource,
}

fn parse_number<T: FromStr>(s: &str, max_len: usize) -> Option<T> {
    if s.is_empty() || s.len() > max_len || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if s.len() > 1 && s.starts_with('0') {
        return None;
    }
    s.parse().ok()
}

fn parse_msn(s: &str) -> Option<u64> {
    parse_number::<u64>(s, 13).filter(|&v| v <= MAX_MSN)
}

/// Parse the (raw, still percent-encoded) path of a request. Only canonical names are accepted:
/// anything percent-encoded, dotted or otherwise unusual is refused, so a parsed path can only
/// name a file the packager wrote.
pub fn parse_hls_path(path: &str) -> Result<HlsPath, PathError> {
    let rest = path.strip_prefix("/hls/").ok_or(PathError::NotHls)?;
    let mut it = rest.split('/');
    let room = it
        .next()
        .and_then(|r| RoomId::from_str(r).ok())
        .ok_or(PathError::BadRoom)?;
    let parts: Vec<&str> = it.take(3).collect();
    let resource = match parts.as_slice() {
        ["index.m3u8"] => HlsResource::Multivariant,
        ["index-opus.m3u8"] => HlsResource::CodecMultivariant(RenditionId::Opus),
        ["index-aac.m3u8"] => HlsResource::CodecMultivariant(RenditionId::Aac),
        ["recording.m3u8"] => HlsResource::Recording,
        ["recording-opus.m3u8"] => HlsResource::CodecRecording(RenditionId::Opus),
        ["recording-aac.m3u8"] => HlsResource::CodecRecording(RenditionId::Aac),
        ["chapters.json"] => HlsResource::ChaptersJson,
        ["chapters.vtt"] => HlsResource::ChaptersVtt,
        ["recording.m4a"] => HlsResource::RecordingM4a,
        [dir @ ("opus" | "aac"), file] => {
            let r = if *dir == "opus" {
                RenditionId::Opus
            } else {
                RenditionId::Aac
            };
            match *file {
                "playlist.m3u8" => HlsResource::MediaPlaylist(r),
                "vod.m3u8" => HlsResource::Vod(r),
                "init.m4a" => HlsResource::Init(r, Naming::Audio),
                "init.mp4" => HlsResource::Init(r, Naming::Legacy),
                f => {
                    let (stem, ext) = f.rsplit_once('.').ok_or(PathError::UnknownResource)?;
                    let naming = Naming::from_media_ext(ext).ok_or(PathError::UnknownResource)?;
                    if let Some(n) = stem.strip_prefix("seg") {
                        let msn = parse_msn(n).ok_or(PathError::UnknownResource)?;
                        HlsResource::Segment(r, msn, naming)
                    } else if let Some(n) = stem.strip_prefix("part") {
                        let (m, p) = n.split_once('.').ok_or(PathError::UnknownResource)?;
                        let msn = parse_msn(m).ok_or(PathError::UnknownResource)?;
                        let part = parse_number::<u32>(p, 3)
                            .filter(|&p| p < PARTS_PER_SEGMENT)
                            .ok_or(PathError::UnknownResource)?;
                        HlsResource::Part(r, msn, part, naming)
                    } else {
                        return Err(PathError::UnknownResource);
                    }
                }
            }
        }
        _ => return Err(PathError::UnknownResource),
    };
    Ok(HlsPath { room, resource })
}

/// Delivery directives of a playlist request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HlsQuery {
    /// `_HLS_msn`.
    pub msn: Option<u64>,
    /// `_HLS_part`.
    pub part: Option<u32>,
    /// `_HLS_skip=YES` or `v2`.
    pub skip: bool,
}

/// Why a query was refused (answered with 400).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueryError {
    /// A directive value is not a plain decimal number in range.
    #[error("{0} must be a decimal integer in range")]
    BadNumber(&'static str),
    /// `_HLS_skip` other than `YES`/`v2`.
    #[error("_HLS_skip must be YES or v2")]
    BadSkip,
    /// A directive given twice.
    #[error("{0} given more than once")]
    Duplicate(&'static str),
    /// `_HLS_part` without `_HLS_msn`.
    #[error("_HLS_part requires _HLS_msn")]
    PartWithoutMsn,
}

/// Parse the raw query string. Parameters other than the `_HLS_` directives (cache busters)
/// are ignored; unknown `_HLS_` directives too, as the spec reserves but does not define them.
pub fn parse_hls_query(query: &str) -> Result<HlsQuery, QueryError> {
    let mut q = HlsQuery::default();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "_HLS_msn" => {
                if q.msn.is_some() {
                    return Err(QueryError::Duplicate("_HLS_msn"));
                }
                q.msn = Some(parse_msn(value).ok_or(QueryError::BadNumber("_HLS_msn"))?);
            }
            "_HLS_part" => {
                if q.part.is_some() {
                    return Err(QueryError::Duplicate("_HLS_part"));
                }
                q.part =
                    Some(parse_number::<u32>(value, 6).ok_or(QueryError::BadNumber("_HLS_part"))?);
            }
            "_HLS_skip" => match value {
                "YES" | "v2" => q.skip = true,
                _ => return Err(QueryError::BadSkip),
            },
            _ => {}
        }
    }
    if q.part.is_some() && q.msn.is_none() {
        return Err(QueryError::PartWithoutMsn);
    }
    Ok(q)
}

impl HlsResource {
    /// Whether this is part of a room's recording proper (its playlists, chapters and file):
    /// private until the host publishes it, gone once deleted. Live playlists and media
    /// objects are not (a live room's listeners had them; the room id is not guessable).
    pub fn is_recording(&self) -> bool {
        matches!(
            self,
            HlsResource::Recording
                | HlsResource::CodecRecording(_)
                | HlsResource::ChaptersJson
                | HlsResource::ChaptersVtt
                | HlsResource::Vod(_)
                | HlsResource::RecordingM4a
        )
    }
}

/// The `sig` parameter of a raw query string (a private recording's signed URL), if present
/// once and non-empty; base64url and `.` only, so it needs no decoding.
pub fn query_sig(query: &str) -> Option<&str> {
    let mut found = None;
    for pair in query.split('&') {
        if let Some(v) = pair.strip_prefix("sig=") {
            if found.is_some() {
                return None;
            }
            found = Some(v);
        }
    }
    found.filter(|v| {
        !v.is_empty()
            && v.len() <= amphi_protocol::token::MAX_TOKEN_LEN
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    })
}

/// What a `Range` request header asks of an object of `len` bytes (RFC 9110 section 14).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable single range (absent, another unit, several ranges, malformed): the whole
    /// object, 200.
    Full,
    /// Bytes `start..=end`: 206 with `Content-Range: bytes start-end/len`.
    Partial {
        /// First byte.
        start: u64,
        /// Last byte (inclusive).
        end: u64,
    },
    /// A well-formed range that starts past the end: 416 with `Content-Range: bytes */len`.
    Unsatisfiable,
}

/// Decide a `Range` header `value` against an object of `len` bytes: one `bytes=a-b`, `a-` or
/// `-n` range is served; anything else gets the whole object (a server may ignore ranges).
/// Network-facing: never panics, whatever the input (fuzzed under `fuzz/`).
pub fn parse_range(value: &str, len: u64) -> RangeAnswer {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeAnswer::Full;
    };
    let spec = spec.trim();
    if spec.contains(',') {
        return RangeAnswer::Full;
    }
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAnswer::Full;
    };
    let num = |s: &str| parse_number::<u64>(s.trim(), 19);
    match (a.trim().is_empty(), b.trim().is_empty()) {
        (true, true) => RangeAnswer::Full,
        (true, false) => match num(b) {
            // The last n bytes.
            Some(0) => RangeAnswer::Unsatisfiable,
            Some(_) if len == 0 => RangeAnswer::Unsatisfiable,
            Some(n) => RangeAnswer::Partial {
                start: len.saturating_sub(n),
                end: len - 1,
            },
            None => RangeAnswer::Full,
        },
        (false, open) => {
            let Some(start) = num(a) else {
                return RangeAnswer::Full;
            };
            let end = if open {
                u64::MAX
            } else {
                match num(b) {
                    Some(e) if e >= start => e,
                    _ => return RangeAnswer::Full,
                }
            };
            if start >= len {
                return RangeAnswer::Unsatisfiable;
            }
            RangeAnswer::Partial {
                start,
                end: end.min(len - 1),
            }
        }
    }
}

/// What to do with a blocking playlist request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadDecision {
    /// Answer now with the current playlist.
    Ready,
    /// Hold until the playlist changes, then decide again.
    Wait,
    /// Too far ahead of the live edge: 400.
    TooFar,
}

/// Decide a blocking reload for `_HLS_msn=msn[&_HLS_part=part]` against the current playlist.
pub fn decide_reload(msn: u64, part: Option<u32>, st: &PlaylistStatus) -> ReloadDecision {
    if st.ended {
        return ReloadDecision::Ready;
    }
    let last_msn = match st.last_complete {
        Some((m, _)) => i128::from(m),
        None => i128::from(st.current_msn) - 1,
    };
    if i128::from(msn) > last_msn + i128::from(MAX_MSN_AHEAD) {
        return ReloadDecision::TooFar;
    }
    let Some(part) = part else {
        return if st.last_complete.is_some_and(|(m, _)| m >= msn) {
            ReloadDecision::Ready
        } else {
            ReloadDecision::Wait
        };
    };
    let per_segment = i128::from(PARTS_PER_SEGMENT);
    let requested = (i128::from(msn) - i128::from(st.current_msn)) * per_segment + i128::from(part);
    let last_published = i128::from(st.current_parts) - 1;
    if requested - last_published > i128::from(ADVANCE_PART_LIMIT) {
        return ReloadDecision::TooFar;
    }
    if msn < st.current_msn {
        // A complete segment: any of its parts is there; a part index past its last part means
        // part 0 of the following segment (rfc8216bis 6.2.5.2).
        match st.last_complete {
            Some((m, parts)) if m == msn && part >= parts => {
                if st.current_parts > 0 {
                    ReloadDecision::Ready
                } else {
                    ReloadDecision::Wait
                }
            }
            _ => ReloadDecision::Ready,
        }
    } else if msn == st.current_msn && part < st.current_parts {
        ReloadDecision::Ready
    } else {
        ReloadDecision::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_of_one_object() {
        use RangeAnswer::*;
        assert_eq!(
            parse_range("bytes=0-99", 1000),
            Partial { start: 0, end: 99 }
        );
        assert_eq!(
            parse_range("bytes=900-", 1000),
            Partial {
                start: 900,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=-100", 1000),
            Partial {
                start: 900,
                end: 999
            }
        );
        assert_eq!(
            parse_range("bytes=-5000", 1000),
            Partial { start: 0, end: 999 }
        );
        assert_eq!(
            parse_range("bytes=990-5000", 1000),
            Partial {
                start: 990,
                end: 999
            }
        );
        assert_eq!(parse_range("bytes=1000-", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 1000), Unsatisfiable);
        assert_eq!(parse_range("bytes=0-", 0), Unsatisfiable);
        for full in [
            "",
            "items=0-1",
            "bytes=0-1,5-6",
            "bytes=5-1",
            "bytes=-",
            "bytes=a-b",
            "bytes=01-2",
            "bytes=99999999999999999999-",
        ] {
            assert_eq!(parse_range(full, 1000), Full, "{full:?}");
        }
    }

    #[test]
    fn a_signed_url_parameter_is_taken_once_and_plain() {
        assert_eq!(query_sig("sig=a.b-c_d"), Some("a.b-c_d"));
        assert_eq!(query_sig("x=1&sig=abc"), Some("abc"));
        assert_eq!(query_sig("sig=abc&sig=abc"), None);
        assert_eq!(query_sig("sig=a%20b"), None);
        assert_eq!(query_sig("sig="), None);
        assert_eq!(query_sig(""), None);
    }

    #[test]
    fn the_recording_file_is_a_recording_resource() {
        let p = parse_hls_path("/hls/00000000000000ab/recording.m4a").unwrap();
        assert_eq!(p.resource, HlsResource::RecordingM4a);
        assert!(p.resource.is_recording());
        let live = parse_hls_path("/hls/00000000000000ab/aac/playlist.m3u8").unwrap();
        assert!(!live.resource.is_recording());
    }

    const ROOM: &str = "00abcdef01234567";

    #[test]
    fn paths_parse_canonical_names_only() {
        let room = RoomId(0x00ab_cdef_0123_4567);
        let ok = |p: &str| parse_hls_path(&format!("/hls/{ROOM}/{p}")).map(|h| h.resource);
        assert_eq!(
            parse_hls_path(&format!("/hls/{ROOM}/index.m3u8")),
            Ok(HlsPath {
                room,
                resource: HlsResource::Multivariant
            })
        );
        assert_eq!(
            ok("opus/playlist.m3u8"),
            Ok(HlsResource::MediaPlaylist(RenditionId::Opus))
        );
        assert_eq!(
            ok("opus/init.m4a"),
            Ok(HlsResource::Init(RenditionId::Opus, Naming::Audio))
        );
        assert_eq!(
            ok("opus/seg12.m4a"),
            Ok(HlsResource::Segment(RenditionId::Opus, 12, Naming::Audio))
        );
        assert_eq!(
            ok("opus/part12.9.m4a"),
            Ok(HlsResource::Part(RenditionId::Opus, 12, 9, Naming::Audio))
        );
        // Older recordings keep being served under the names they were stored with.
        for (name, key) in [
            ("opus/init.mp4", "opus/init.mp4"),
            ("opus/seg12.m4s", "opus/seg12.m4s"),
            ("aac/part3.0.m4s", "aac/part3.0.m4s"),
            ("aac/part3.0.m4a", "aac/part3.0.m4a"),
            ("aac/init.m4a", "aac/init.m4a"),
        ] {
            let r = ok(name).unwrap();
            assert_eq!(r.media_key(room), Some(format!("{ROOM}/{key}")), "{name}");
        }
        assert_eq!(
            ok("aac/part3.0.m4s"),
            Ok(HlsResource::Part(RenditionId::Aac, 3, 0, Naming::Legacy))
        );
        assert_eq!(HlsResource::Multivariant.media_key(room), None);
        assert_eq!(ok("recording.m3u8"), Ok(HlsResource::Recording));
        assert_eq!(
            ok("index-opus.m3u8"),
            Ok(HlsResource::CodecMultivariant(RenditionId::Opus))
        );
        assert_eq!(
            ok("recording-aac.m3u8"),
            Ok(HlsResource::CodecRecording(RenditionId::Aac))
        );
        assert_eq!(ok("chapters.json"), Ok(HlsResource::ChaptersJson));
        assert_eq!(ok("chapters.vtt"), Ok(HlsResource::ChaptersVtt));
        assert_eq!(ok("aac/vod.m3u8"), Ok(HlsResource::Vod(RenditionId::Aac)));
        for bad in [
            "opus/part12.10.m4s",
            "opus/part12.1.m4v",
            "opus/seg12.mp4",
            "opus/seg12",
            "opus/init.m4s",
            "opus/seg012.m4a",
            "opus/seg-1.m4s",
            "opus/seg+1.m4s",
            "opus/seg.m4s",
            "opus/part1.m4s",
            "opus/part1..m4s",
            "opus/../index.m3u8",
            "opus/%2e%2e/x",
            "opus/seg99999999999999999999.m4s",
            "opus/playlist.m3u8/",
            "flac/playlist.m3u8",
            "index-flac.m3u8",
            "index-.m3u8",
            "opus/index-opus.m3u8",
            "aac/../opus/init.mp4",
            "",
            "opus",
            "..",
        ] {
            assert_eq!(ok(bad), Err(PathError::UnknownResource), "{bad}");
        }
        for bad in [
            "/hls/../etc/passwd",
            "/hls/%2e%2e/x",
            "/hls/0123/index.m3u8",
            "/hls/",
        ] {
            assert_eq!(parse_hls_path(bad), Err(PathError::BadRoom), "{bad}");
        }
        assert_eq!(parse_hls_path("/metrics"), Err(PathError::NotHls));
    }

    #[test]
    fn queries_parse_and_reject() {
        assert_eq!(parse_hls_query(""), Ok(HlsQuery::default()));
        assert_eq!(
            parse_hls_query("_HLS_msn=5&_HLS_part=2&_HLS_skip=YES&cb=1"),
            Ok(HlsQuery {
                msn: Some(5),
                part: Some(2),
                skip: true
            })
        );
        assert_eq!(
            parse_hls_query("_HLS_part=2"),
            Err(QueryError::PartWithoutMsn)
        );
        for bad in [
            "_HLS_msn=",
            "_HLS_msn=-1",
            "_HLS_msn=abc",
            "_HLS_msn=1e3",
            "_HLS_msn=%31",
            "_HLS_msn=99999999999999999999999",
            "_HLS_msn=1&_HLS_part=x",
            "_HLS_msn=1&_HLS_part=9999999",
        ] {
            assert!(
                matches!(parse_hls_query(bad), Err(QueryError::BadNumber(_))),
                "{bad}"
            );
        }
        assert_eq!(parse_hls_query("_HLS_skip=NO"), Err(QueryError::BadSkip));
        assert_eq!(
            parse_hls_query("_HLS_msn=1&_HLS_msn=2"),
            Err(QueryError::Duplicate("_HLS_msn"))
        );
    }

    fn status(last: Option<(u64, u32)>, cur: u64, parts: u32) -> PlaylistStatus {
        PlaylistStatus {
            ended: false,
            media_sequence: 0,
            last_complete: last,
            current_msn: cur,
            current_parts: parts,
        }
    }

    #[test]
    fn reload_decisions() {
        use ReloadDecision::*;
        // Segments 0..=4 complete (10 parts each), segment 5 has 3 parts.
        let st = status(Some((4, 10)), 5, 3);
        assert_eq!(decide_reload(4, None, &st), Ready);
        assert_eq!(decide_reload(5, None, &st), Wait);
        assert_eq!(decide_reload(6, None, &st), Wait);
        assert_eq!(decide_reload(7, None, &st), TooFar);
        assert_eq!(decide_reload(1, Some(0), &st), Ready, "behind: answer now");
        assert_eq!(decide_reload(5, Some(2), &st), Ready);
        assert_eq!(decide_reload(5, Some(3), &st), Wait);
        assert_eq!(decide_reload(4, Some(10), &st), Ready, "past the end = 5.0");
        assert_eq!(decide_reload(6, Some(7), &st), Wait, "15 parts ahead");
        assert_eq!(decide_reload(6, Some(8), &st), TooFar, "16 parts ahead");
        // Segment 0 finished early with 3 parts; nothing of segment 1 yet.
        let st = status(Some((0, 3)), 1, 0);
        assert_eq!(decide_reload(0, Some(3), &st), Wait, "means 1.0");
        assert_eq!(decide_reload(0, Some(2), &st), Ready);
        // Nothing at all yet.
        let st = status(None, 0, 0);
        assert_eq!(decide_reload(0, Some(0), &st), Wait);
        assert_eq!(decide_reload(1, None, &st), Wait);
        assert_eq!(decide_reload(2, None, &st), TooFar);
        // Ended playlists answer at once, whatever was asked.
        let mut st = status(Some((4, 10)), 5, 0);
        st.ended = true;
        assert_eq!(decide_reload(9, Some(9), &st), Ready);
    }
}

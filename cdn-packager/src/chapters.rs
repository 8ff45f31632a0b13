//! Sans-IO chapters of a recording for podcast players, from its speaker turns: a Podcasting 2.0
//! chapters JSON (`chapters.json`, `{"version":"1.2.0","chapters":[{"startTime":..,"title":..}]}`)
//! and a WebVTT chapters track (`chapters.vtt`), stored beside the recording's multivariant
//! playlist. Each turn is one chapter titled with the speaker's display name.
//!
//! Chapter times are positions in the VOD playlist's media (the sum of `EXTINF` durations before
//! a point), not wall-clock offsets: a packager restart leaves a hole in wall-clock time that the
//! recording does not play.

use crate::playlist::{ticks_duration, SegmentSummary};
use crate::speakers::SpeakerSpan;
use std::fmt::Write;
use std::time::{Duration, SystemTime};

/// Storage key of the chapters JSON, relative to the room's directory.
pub const CHAPTERS_JSON: &str = "chapters.json";
/// Storage key of the WebVTT chapters, relative to the room's directory.
pub const CHAPTERS_VTT: &str = "chapters.vtt";
/// The Podcasting 2.0 chapters format version written.
pub const CHAPTERS_VERSION: &str = "1.2.0";

/// One chapter: start and end in the recording's media time, and its title.
#[derive(Clone, Debug, PartialEq)]
pub struct Chapter {
    /// Start, seconds from the start of the recording.
    pub start: Duration,
    /// End, seconds from the start of the recording.
    pub end: Duration,
    /// The speaker's display name (`Speaker {participant id}` when unnamed).
    pub title: String,
}

/// Where wall-clock time `t` falls in the recording made of `history`: the media before the
/// segment holding it plus its offset in that segment (a time in a hole between segments maps
/// to the start of the next one).
fn media_position(history: &[SegmentSummary], t: SystemTime) -> Duration {
    let mut before = Duration::ZERO;
    for seg in history {
        let len = ticks_duration(seg.duration);
        let Ok(into) = t.duration_since(seg.start.program_date_time) else {
            return before;
        };
        if into < len {
            return before + into;
        }
        before += len;
    }
    before
}

/// The chapters of a recording made of `history` (the VOD's segments) with `spans` (its speaker
/// turns); turns outside the recorded media are left out.
pub fn chapters(spans: &[SpeakerSpan], history: &[SegmentSummary]) -> Vec<Chapter> {
    spans
        .iter()
        .filter_map(|span| {
            let start = media_position(history, span.start);
            let end = media_position(history, span.start + span.duration);
            let name = span.who.as_ref().map_or("", |w| w.name.trim());
            let title = if name.is_empty() {
                format!("Speaker {}", span.speaker)
            } else {
                name.to_string()
            };
            (end > start).then_some(Chapter { start, end, title })
        })
        .collect()
}

/// Seconds rounded to the millisecond.
fn secs(d: Duration) -> f64 {
    d.as_millis() as f64 / 1000.0
}

/// The Podcasting 2.0 chapters JSON of `chapters`.
pub fn render_json(chapters: &[Chapter]) -> String {
    let list: Vec<serde_json::Value> = chapters
        .iter()
        .map(|c| {
            serde_json::json!({
                "startTime": secs(c.start),
                "endTime": secs(c.end),
                "title": c.title,
            })
        })
        .collect();
    serde_json::json!({ "version": CHAPTERS_VERSION, "chapters": list }).to_string()
}

fn vtt_time(out: &mut String, d: Duration) {
    let ms = d.as_millis();
    let _ = write!(
        out,
        "{:02}:{:02}:{:02}.{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    );
}

/// The WebVTT chapters track of `chapters` (cue text escaped: `&`, `<`, `>` as character
/// references, line breaks as spaces, so a title is one line that cannot end the cue).
pub fn render_vtt(chapters: &[Chapter]) -> String {
    let mut out = String::from("WEBVTT\n");
    for (n, c) in chapters.iter().enumerate() {
        let _ = write!(out, "\nchapter-{}\n", n + 1);
        vtt_time(&mut out, c.start);
        out.push_str(" --> ");
        vtt_time(&mut out, c.end);
        out.push('\n');
        for ch in c.title.chars() {
            match ch {
                '&' => out.push_str("&amp;"),
                '<' => out.push_str("&lt;"),
                '>' => out.push_str("&gt;"),
                c if c.is_control() => out.push(' '),
                c => out.push(c),
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::segmenter::SegmentStart;
    use crate::speakers::Speaker;

    const T0: u64 = 1_700_000_000_000;

    fn at(ms: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_millis(T0 + ms)
    }

    fn seg(msn: u64, start_ms: u64, disc: bool) -> SegmentSummary {
        SegmentSummary {
            msn,
            start: SegmentStart {
                program_date_time: at(start_ms),
                discontinuity: disc,
            },
            duration: 96_000,
            gap: false,
            naming: crate::playlist::Naming::Audio,
        }
    }

    fn span(speaker: u32, from_ms: u64, ms: u64, name: Option<&str>) -> SpeakerSpan {
        SpeakerSpan {
            speaker,
            start: at(from_ms),
            duration: Duration::from_millis(ms),
            who: name.map(|n| Speaker {
                user: "u-1".into(),
                name: n.into(),
            }),
        }
    }

    #[test]
    fn chapters_are_media_positions_across_a_restart_hole() {
        // Segments 0..3 (6 s), then a 10 s hole (a packager restart), then 3..5.
        let history = [
            seg(0, 0, false),
            seg(1, 2000, false),
            seg(2, 4000, false),
            seg(3, 16_000, true),
            seg(4, 18_000, false),
        ];
        let spans = [
            span(7, 500, 3000, Some("Ada <Lovelace> & co\nx")),
            span(9, 5000, 13_000, None),
            span(3, 30_000, 2000, Some("after the end")),
        ];
        let ch = chapters(&spans, &history);
        assert_eq!(
            ch,
            vec![
                Chapter {
                    start: Duration::from_millis(500),
                    end: Duration::from_millis(3500),
                    title: "Ada <Lovelace> & co\nx".into()
                },
                // 5 s is in segment 2; 18 s is 2 s into the part after the hole.
                Chapter {
                    start: Duration::from_millis(5000),
                    end: Duration::from_millis(8000),
                    title: "Speaker 9".into()
                },
            ]
        );
        let json: serde_json::Value = serde_json::from_str(&render_json(&ch)).unwrap();
        assert_eq!(json["version"], "1.2.0");
        assert_eq!(json["chapters"][0]["startTime"], 0.5);
        assert_eq!(json["chapters"][0]["endTime"], 3.5);
        assert_eq!(json["chapters"][0]["title"], "Ada <Lovelace> & co\nx");
        assert_eq!(json["chapters"][1]["startTime"], 5.0);
        assert_eq!(json["chapters"].as_array().unwrap().len(), 2);
        assert_eq!(
            render_vtt(&ch),
            "WEBVTT\n\nchapter-1\n00:00:00.500 --> 00:00:03.500\nAda &lt;Lovelace&gt; &amp; co x\n\
             \nchapter-2\n00:00:05.000 --> 00:00:08.000\nSpeaker 9\n"
        );
    }

    #[test]
    fn vtt_times_count_hours_and_an_empty_recording_has_no_chapters() {
        let mut s = String::new();
        vtt_time(&mut s, Duration::from_millis(3_723_004));
        assert_eq!(s, "01:02:03.004");
        assert_eq!(render_vtt(&[]), "WEBVTT\n");
        assert_eq!(
            render_json(&chapters(&[span(1, 0, 1000, Some("x"))], &[])),
            r#"{"chapters":[],"version":"1.2.0"}"#
        );
    }
}

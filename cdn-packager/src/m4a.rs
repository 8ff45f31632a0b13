//! Sans-IO: the single downloadable file of a published recording, `recording.m4a`: a flat
//! (non-fragmented) MP4 of the AAC-LC rendition — `ftyp`, `moov` with the sample tables of every
//! sample of the recording, then one `mdat` — whose `moov/udta` carries a Nero chapter list
//! (`chpl`, read by ffmpeg, VLC, foobar2000, MP4Box and most podcast apps) with one chapter per
//! speaker turn, titled with the speaker's display name.
//!
//! It is built once, when the host publishes the recording, from the rendition's CMAF init
//! segment and its VOD segments in playlist order (the packager's own objects: `[styp] moof mdat`
//! chunks of one track). Samples are laid end to end, so chapter times, which count the VOD's
//! media (the sum of `EXTINF`s), are times in the file. A chapter list holds at most 255
//! chapters: longer lists keep the first 255 (turns of the same speaker in a row are merged
//! first).

use crate::chapters::Chapter;
use crate::fmp4::TRACK_ID;
use mp4_atom::{
    Any, Chpl, ChplEntry, Decode, Edts, Elst, ElstEntry, Encode, Ftyp, Stco, Stsc, StscEntry, Stsz,
    StszSamples, Stts, SttsEntry, Udta,
};
use std::io::Cursor;
use std::time::Duration;

/// Storage key of the downloadable file, relative to the room's directory.
pub const RECORDING_M4A: &str = "recording.m4a";
/// Most chapters a `chpl` box can list.
pub const MAX_CHAPTERS: usize = 255;
/// Longest chapter title in a `chpl` box, bytes.
const MAX_TITLE_BYTES: usize = 255;
/// `chpl` times are in units of 100 ns.
const CHPL_UNITS_PER_SEC: u128 = 10_000_000;
/// `mdat` box header: 32-bit size and type.
const MDAT_HEADER_LEN: usize = 8;

/// Why the file could not be built.
#[derive(Debug, thiserror::Error)]
pub enum M4aError {
    /// The init segment is not `ftyp` + `moov` with one track.
    #[error("init segment: {0}")]
    Init(&'static str),
    /// A segment is not a sequence of CMAF chunks of the track.
    #[error("segment {index}: {why}")]
    Segment {
        /// Its position in the list given.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// There is no sample to write.
    #[error("the recording has no media")]
    Empty,
    /// Past what a 32-bit `mdat`/`stco` can address (about 4 GiB).
    #[error("the recording is too large for one file")]
    TooLarge,
    /// `mp4-atom` refused a box.
    #[error("mp4: {0}")]
    Mp4(#[from] mp4_atom::Error),
}

/// The samples of the track, in decode order.
#[derive(Default)]
struct Samples {
    sizes: Vec<u32>,
    durations: Vec<u32>,
    data: Vec<u8>,
}

impl Samples {
    /// Append the samples of every chunk of one segment.
    fn add_segment(&mut self, seg: &[u8], default_duration: u32) -> Result<(), String> {
        let mut cur = Cursor::new(seg);
        while (cur.position() as usize) < seg.len() {
            let start = cur.position() as usize;
            let atom = Any::decode(&mut cur).map_err(|e| e.to_string())?;
            let Any::Moof(moof) = atom else {
                // styp, mdat: the samples are read through the moof's data offset.
                continue;
            };
            for traf in moof.traf.iter().filter(|t| t.tfhd.track_id == TRACK_ID) {
                let base = match traf.tfhd.base_data_offset {
                    Some(b) => usize::try_from(b).map_err(|_| "base data offset")?,
                    // default-base-is-moof (what the packager writes), or the moof anyway
                    // for a lone track fragment.
                    None => start,
                };
                for trun in &traf.trun {
                    let offset = usize::try_from(trun.data_offset.unwrap_or(0))
                        .map_err(|_| "negative data offset")?;
                    let mut at = base.checked_add(offset).ok_or("data offset")?;
                    for entry in trun.samples.iter() {
                        let size = entry
                            .size
                            .or(traf.tfhd.default_sample_size)
                            .ok_or("sample without a size")?;
                        let duration = entry
                            .duration
                            .or(traf.tfhd.default_sample_duration)
                            .unwrap_or(default_duration);
                        let end = at.checked_add(size as usize).ok_or("sample size")?;
                        let bytes = seg.get(at..end).ok_or("sample outside the segment")?;
                        self.data.extend_from_slice(bytes);
                        self.sizes.push(size);
                        self.durations.push(duration);
                        at = end;
                    }
                }
            }
        }
        Ok(())
    }

    /// Run-length `stts` entries.
    fn stts(&self) -> Stts {
        let mut entries: Vec<SttsEntry> = Vec::new();
        for &d in &self.durations {
            match entries.last_mut() {
                Some(e) if e.sample_delta == d => e.sample_count += 1,
                _ => entries.push(SttsEntry {
                    sample_count: 1,
                    sample_delta: d,
                }),
            }
        }
        Stts { entries }
    }
}

/// The `chpl` list of `chapters`: consecutive chapters with one title merged, at most
/// [`MAX_CHAPTERS`], titles cut to 255 bytes on a character boundary.
pub fn chapter_list(chapters: &[Chapter]) -> Chpl {
    let mut entries: Vec<ChplEntry> = Vec::new();
    let mut last_title: Option<&str> = None;
    for c in chapters {
        if last_title == Some(c.title.as_str()) {
            continue;
        }
        last_title = Some(c.title.as_str());
        if entries.len() == MAX_CHAPTERS {
            break;
        }
        let mut cut = c.title.len().min(MAX_TITLE_BYTES);
        while !c.title.is_char_boundary(cut) {
            cut -= 1;
        }
        let start = c.start.as_nanos() * CHPL_UNITS_PER_SEC / 1_000_000_000;
        entries.push(ChplEntry {
            start: u64::try_from(start).unwrap_or(u64::MAX),
            title: c.title[..cut].to_string(),
        });
    }
    Chpl { entries }
}

/// Build `recording.m4a` from the rendition's CMAF `init` segment and its `segments` (in VOD
/// playlist order), with `chapters` (times in the VOD's media).
pub fn build(init: &[u8], segments: &[&[u8]], chapters: &[Chapter]) -> Result<Vec<u8>, M4aError> {
    let mut cur = Cursor::new(init);
    let Ok(Any::Ftyp(_)) = Any::decode(&mut cur) else {
        return Err(M4aError::Init("no ftyp"));
    };
    let Ok(Any::Moov(mut moov)) = Any::decode(&mut cur) else {
        return Err(M4aError::Init("no moov"));
    };
    let default_duration = moov
        .mvex
        .as_ref()
        .and_then(|m| m.trex.iter().find(|t| t.track_id == TRACK_ID))
        .map_or(0, |t| t.default_sample_duration);
    let mut samples = Samples::default();
    for (index, seg) in segments.iter().enumerate() {
        samples
            .add_segment(seg, default_duration)
            .map_err(|why| M4aError::Segment { index, why })?;
    }
    if samples.sizes.is_empty() {
        return Err(M4aError::Empty);
    }
    let count = u32::try_from(samples.sizes.len()).map_err(|_| M4aError::TooLarge)?;
    let ticks: u64 = samples.durations.iter().map(|&d| u64::from(d)).sum();
    let ftyp = Ftyp {
        major_brand: b"M4A ".into(),
        minor_version: 0,
        compatible_brands: vec![b"M4A ".into(), b"mp42".into(), b"isom".into()],
    };
    moov.mvex = None;
    moov.mvhd.duration = ticks;
    moov.udta = Some(Udta {
        chpl: Some(chapter_list(chapters)),
        ..Default::default()
    });
    let movie_scale = u64::from(moov.mvhd.timescale.max(1));
    let trak = moov
        .trak
        .iter_mut()
        .find(|t| t.tkhd.track_id == TRACK_ID)
        .ok_or(M4aError::Init("no track"))?;
    let media_scale = u64::from(trak.mdia.mdhd.timescale.max(1));
    trak.mdia.mdhd.duration = ticks;
    // The encoder delay stays skipped by the edit list; the track plays for the rest.
    let delay = trak
        .edts
        .as_ref()
        .and_then(|e| e.elst.as_ref())
        .and_then(|l| l.entries.first())
        .and_then(|e| e.media_time)
        .unwrap_or(0);
    let shown = ticks.saturating_sub(delay) * movie_scale / media_scale;
    trak.tkhd.duration = shown;
    trak.edts = Some(Edts {
        elst: Some(Elst {
            entries: vec![ElstEntry {
                segment_duration: shown,
                media_time: Some(delay),
                media_rate: 1.into(),
            }],
        }),
    });
    let stbl = &mut trak.mdia.minf.stbl;
    stbl.stts = samples.stts();
    stbl.stsc = Stsc {
        entries: vec![StscEntry {
            first_chunk: 1,
            samples_per_chunk: count,
            sample_description_index: 1,
        }],
    };
    stbl.stsz = Stsz {
        samples: StszSamples::Different {
            sizes: std::mem::take(&mut samples.sizes),
        },
    };
    stbl.sgpd.clear();
    stbl.sbgp.clear();
    // One chunk: the whole mdat payload. Its offset depends on the moov's size, whose stco
    // width does not: encode once with 0 to measure.
    stbl.stco = Some(Stco { entries: vec![0] });
    stbl.co64 = None;
    let mut head = Vec::with_capacity(4096 + samples.durations.len() * 4);
    ftyp.encode(&mut head)?;
    moov.encode(&mut head)?;
    let offset = u32::try_from(head.len() + MDAT_HEADER_LEN).map_err(|_| M4aError::TooLarge)?;
    if let Some(trak) = moov.trak.iter_mut().find(|t| t.tkhd.track_id == TRACK_ID) {
        trak.mdia.minf.stbl.stco = Some(Stco {
            entries: vec![offset],
        });
    }
    head.clear();
    ftyp.encode(&mut head)?;
    moov.encode(&mut head)?;
    let mdat_len =
        u32::try_from(MDAT_HEADER_LEN + samples.data.len()).map_err(|_| M4aError::TooLarge)?;
    let mut out = head;
    out.reserve_exact(MDAT_HEADER_LEN + samples.data.len());
    out.extend_from_slice(&mdat_len.to_be_bytes());
    out.extend_from_slice(b"mdat");
    out.extend_from_slice(&samples.data);
    Ok(out)
}

/// Chapters from a stored Podcasting 2.0 chapters JSON (`chapters.json`, written by
/// [`crate::chapters::render_json`]); entries without a start or a title are skipped, and an
/// unreadable file gives none.
pub fn chapters_from_json(json: &[u8]) -> Vec<Chapter> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let Some(list) = v["chapters"].as_array() else {
        return Vec::new();
    };
    let secs = |x: &serde_json::Value| {
        x.as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e9)
            .map(Duration::from_secs_f64)
    };
    list.iter()
        .filter_map(|c| {
            let start = secs(&c["startTime"])?;
            let end = secs(&c["endTime"]).unwrap_or(start);
            let title = c["title"].as_str()?.to_string();
            Some(Chapter { start, end, title })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fmp4::{init_segment_aac, ChunkWriter, AAC_FRAME_SAMPLES};
    use mp4_atom::Moov;

    /// The decoded `moov` of a built file.
    fn moov_of(file: &[u8]) -> Option<Moov> {
        let mut cur = Cursor::new(file);
        while (cur.position() as usize) < file.len() {
            if let Any::Moov(m) = Any::decode(&mut cur).ok()? {
                return Some(m);
            }
        }
        None
    }

    fn chapter(start_ms: u64, title: &str) -> Chapter {
        Chapter {
            start: Duration::from_millis(start_ms),
            end: Duration::from_millis(start_ms + 500),
            title: title.into(),
        }
    }

    /// Two segments of two chunks each, sample `i` holding `i+1` bytes of value `i`.
    fn segments() -> Vec<Vec<u8>> {
        let mut w = ChunkWriter::aac();
        let mut segs = Vec::new();
        let mut n = 0u8;
        for s in 0..2u64 {
            let mut seg = Vec::new();
            for c in 0..2u64 {
                let sizes: Vec<u32> = (0..3).map(|i| u32::from(n + i) + 1).collect();
                let payload: Vec<u8> = (0..3u8)
                    .flat_map(|i| std::iter::repeat_n(n + i, usize::from(n + i) + 1))
                    .collect();
                let t = (s * 2 + c) * 3 * u64::from(AAC_FRAME_SAMPLES);
                w.write_chunk(t, &sizes, &payload, c == 0, &mut seg)
                    .unwrap();
                n += 3;
            }
            segs.push(seg);
        }
        segs
    }

    #[test]
    fn a_flat_file_holds_every_sample_in_order_with_the_chapters() {
        let init = init_segment_aac(&[0x11, 0x88], 64_000, 2048).unwrap();
        let segs = segments();
        let refs: Vec<&[u8]> = segs.iter().map(Vec::as_slice).collect();
        let chapters = [
            chapter(0, "Ada"),
            chapter(1200, "Ada"),
            chapter(2500, "Grace é"),
        ];
        let file = build(&init, &refs, &chapters).unwrap();
        assert_eq!(&file[4..8], b"ftyp");
        assert_eq!(&file[8..12], b"M4A ");
        let moov = moov_of(&file).unwrap();
        assert!(moov.mvex.is_none(), "not fragmented");
        let trak = &moov.trak[0];
        let stbl = &trak.mdia.minf.stbl;
        let StszSamples::Different { sizes } = &stbl.stsz.samples else {
            panic!("sizes")
        };
        assert_eq!(sizes, &(1..=12).collect::<Vec<u32>>());
        assert_eq!(
            stbl.stts.entries,
            vec![SttsEntry {
                sample_count: 12,
                sample_delta: AAC_FRAME_SAMPLES
            }]
        );
        assert_eq!(trak.mdia.mdhd.duration, 12 * 1024);
        let elst = &trak.edts.as_ref().unwrap().elst.as_ref().unwrap().entries[0];
        assert_eq!(elst.media_time, Some(2048));
        assert_eq!(elst.segment_duration, 12 * 1024 - 2048);
        // The one chunk starts right after the mdat header and holds samples 0..12 in order.
        let off = stbl.stco.as_ref().unwrap().entries[0] as usize;
        assert_eq!(&file[off - 4..off], b"mdat");
        let expected: Vec<u8> = (0..12u8)
            .flat_map(|i| std::iter::repeat_n(i, usize::from(i) + 1))
            .collect();
        assert_eq!(&file[off..], expected.as_slice());
        // Chapters: Ada's two turns in a row are one chapter; 100 ns units.
        let chpl = moov.udta.unwrap().chpl.unwrap();
        assert_eq!(
            chpl.entries,
            vec![
                ChplEntry {
                    start: 0,
                    title: "Ada".into()
                },
                ChplEntry {
                    start: 25_000_000,
                    title: "Grace é".into()
                }
            ]
        );
    }

    #[test]
    fn chapter_lists_are_capped_and_titles_cut_on_a_character_boundary() {
        let long = "é".repeat(200);
        let many: Vec<Chapter> = (0..300)
            .map(|i| chapter(i * 1000, &format!("{long}{}", i % 2)))
            .collect();
        let chpl = chapter_list(&many);
        assert_eq!(chpl.entries.len(), MAX_CHAPTERS);
        assert!(chpl.entries.iter().all(|e| e.title.len() <= 255));
        assert_eq!(chpl.entries[0].title.len(), 254, "127 two-byte characters");
        // It encodes: one byte of count, one byte per title length.
        let mut out = Vec::new();
        chpl.encode(&mut out).unwrap();
    }

    #[test]
    fn broken_inputs_are_errors_not_panics() {
        let init = init_segment_aac(&[0x11, 0x88], 64_000, 2048).unwrap();
        assert!(matches!(build(&init, &[], &[]), Err(M4aError::Empty)));
        assert!(matches!(build(b"junk", &[], &[]), Err(M4aError::Init(_))));
        let segs = segments();
        let cut = &segs[0][..segs[0].len() - 3];
        assert!(matches!(
            build(&init, &[cut], &[]),
            Err(M4aError::Segment { index: 0, .. })
        ));
    }

    #[test]
    fn chapters_come_back_from_the_stored_json() {
        let json = crate::chapters::render_json(&[chapter(0, "Ada"), chapter(1500, "Grace")]);
        let back = chapters_from_json(json.as_bytes());
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].title, "Grace");
        assert_eq!(back[1].start, Duration::from_millis(1500));
        assert!(chapters_from_json(b"{").is_empty());
    }
}

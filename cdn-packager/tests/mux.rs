//! The fMP4 output read by independent readers: the `mp4` crate and ffprobe/ffmpeg.

use amphi_testkit::packager as common;

use amphi_packager::fmp4::init_segment;
use amphi_packager::segmenter::{ProgramFrame, Segmenter, SegmenterOutput};
use common::{dominant_frequency, ffmpeg_decode, ffmpeg_stdout, scratch_dir, tone_frames};
use std::io::Cursor;
use std::time::{Duration, Instant, SystemTime};

fn package(frames: &[Vec<u8>]) -> Vec<SegmenterOutput> {
    let mut s = Segmenter::default();
    let t0 = Instant::now();
    let mut out = Vec::new();
    for (i, f) in frames.iter().enumerate() {
        let dt = Duration::from_millis(20 * i as u64);
        out.extend(
            s.push(
                ProgramFrame {
                    rtp_ts: 48_000 + i as u32 * 960,
                    payload: f,
                },
                t0 + dt,
                SystemTime::now(),
            )
            .unwrap(),
        );
    }
    out.extend(s.stream_stopped().unwrap());
    out
}

fn mp4_read(bytes: &[u8]) -> mp4::Mp4Reader<Cursor<&[u8]>> {
    mp4::Mp4Reader::read_header(Cursor::new(bytes), bytes.len() as u64).expect("mp4 parses")
}

#[test]
fn mp4_crate_reads_init_and_every_fragment() {
    let frames = tone_frames(440.0, 125);
    let init = init_segment().unwrap();
    let r = mp4_read(&init);
    assert_eq!(r.tracks().len(), 1);
    let track = &r.tracks()[&1];
    assert_eq!(track.track_type().unwrap(), mp4::TrackType::Audio);
    assert_eq!(track.timescale(), 48_000);
    assert!(r.moov.mvex.is_some(), "init announces fragments");

    let outputs = package(&frames);
    let mut parts = 0;
    let mut segments = 0;
    for o in &outputs {
        let (bytes, expected) = match o {
            SegmenterOutput::Part(p) => {
                parts += 1;
                (&p.bytes, p.frames)
            }
            SegmenterOutput::Segment(s) => {
                segments += 1;
                (&s.bytes, s.frames)
            }
        };
        let mut file = init.clone();
        file.extend_from_slice(bytes);
        let r = mp4_read(&file);
        assert!(r.is_fragmented());
        assert_eq!(r.sample_count(1).unwrap(), expected);
    }
    assert_eq!(
        (parts, segments),
        (13, 2),
        "10 + 3 parts (last one 5 frames)"
    );
}

#[tokio::test]
async fn ffprobe_and_ffmpeg_read_init_plus_segment() {
    let frames = tone_frames(440.0, 100);
    let outputs = package(&frames);
    let seg = outputs
        .iter()
        .find_map(|o| match o {
            SegmenterOutput::Segment(s) => Some(s.bytes.clone()),
            _ => None,
        })
        .unwrap();
    let dir = scratch_dir("mux");
    let path = dir.join("seg0.mp4");
    let mut file = init_segment().unwrap();
    file.extend_from_slice(&seg);
    std::fs::write(&path, &file).unwrap();
    let p = path.to_string_lossy().into_owned();

    let probe = ffmpeg_stdout(
        "ffprobe",
        vec![
            "-v".into(),
            "error".into(),
            "-show_streams".into(),
            "-of".into(),
            "json".into(),
            p.clone(),
        ],
    )
    .await;
    let v: serde_json::Value = serde_json::from_slice(&probe).unwrap();
    let stream = &v["streams"][0];
    assert_eq!(stream["codec_name"], "opus", "{v}");
    assert_eq!(stream["sample_rate"], "48000", "{v}");
    assert_eq!(stream["channels"], 1, "{v}");

    let samples = ffmpeg_decode(&p).await;
    assert!(
        samples.len() > 90_000,
        "about 2 s decoded, got {}",
        samples.len()
    );
    let (freq, rms) = dominant_frequency(&samples[9_600..9_600 + 24_000]);
    assert!((freq - 440.0).abs() <= 5.0, "dominant {freq} Hz");
    assert!(rms > 3000.0, "rms {rms}");
    let _ = std::fs::remove_dir_all(&dir);
}

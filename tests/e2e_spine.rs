//! End to end through every component with real processes and real clients: our str0m WHIP
//! client publishes Opus tones into edges, and the LL-HLS output is fetched over HTTP, parsed with
//! m3u8-rs and the mp4 crate, probed with ffprobe and decoded with ffmpeg.

use amphi_testkit::mesh as support;

use std::io::Cursor;
use std::time::Duration;
use support::*;

fn check_init_and_fragments_with_mp4_crate(init: &[u8], segments: &[Vec<u8>]) {
    let reader = mp4::Mp4Reader::read_header(Cursor::new(init), init.len() as u64)
        .expect("mp4 crate reads init.mp4");
    assert_eq!(reader.tracks().len(), 1, "one audio track");
    let track = reader.tracks().values().next().unwrap();
    assert_eq!(track.timescale(), 48_000);
    for (i, seg) in segments.iter().enumerate() {
        let mut cursor = Cursor::new(seg.as_slice());
        let mut moofs = 0;
        let mut mdats = 0;
        while (cursor.position() as usize) < seg.len() {
            let header = mp4::BoxHeader::read(&mut cursor)
                .unwrap_or_else(|e| panic!("segment {i}: box header: {e}"));
            let start = cursor.position() - 8;
            match header.name {
                mp4::BoxType::MoofBox => {
                    mp4::ReadBox::<_>::read_box(&mut cursor, header.size)
                        .map(|_: mp4::MoofBox| moofs += 1)
                        .unwrap_or_else(|e| panic!("segment {i}: moof: {e}"));
                }
                _ => {
                    if header.name == mp4::BoxType::MdatBox {
                        mdats += 1;
                    }
                    cursor.set_position(start + header.size);
                }
            }
        }
        assert!(
            moofs >= 1 && moofs == mdats,
            "segment {i}: {moofs} moof / {mdats} mdat"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tone_from_str0m_whip_client_reaches_ll_hls() {
    let mesh = DevMesh::start(10_000, "spine-one");
    let (room, _host, hls_url) = mesh.create_room("spine tone");
    let token = mesh.token(&room, "speaker", "tone-440");
    let route = mesh.route(&room, "us-east");
    assert_eq!(route["region"], "us-east");
    let whip = route["whip_url"].as_str().unwrap().to_string();

    publish_tone(&whip, &token, 440.0, 7.0).await;

    let media_url = tokio::task::spawn_blocking(move || media_playlist_url(&hls_url))
        .await
        .unwrap();
    let text = {
        let u = media_url.clone();
        tokio::task::spawn_blocking(move || wait_for_segments(&u, 3, Duration::from_secs(20)))
            .await
            .unwrap()
    };
    for tag in [
        "#EXT-X-SERVER-CONTROL:CAN-BLOCK-RELOAD=YES",
        "PART-HOLD-BACK=",
        "#EXT-X-PART-INF:PART-TARGET=0.2",
        "#EXT-X-PART:",
        "#EXT-X-PROGRAM-DATE-TIME:",
        "#EXT-X-MAP:URI=",
    ] {
        assert!(text.contains(tag), "playlist lacks {tag}:\n{text}");
    }
    let dir = mesh.data_dir.parent().unwrap().to_path_buf();
    let (file, init, segments) = download_media(&media_url, &text, &dir);
    check_init_and_fragments_with_mp4_crate(&init, &segments);

    let path = file.to_str().unwrap().to_string();
    let (codec, rate, channels) = ffprobe_audio(&path);
    assert_eq!((codec.as_str(), rate, channels), ("opus", 48_000, 1));
    let samples = ffmpeg_decode(&path);
    let (freq, level) = dominant_frequency(&samples);
    assert!((freq - 440.0).abs() <= 5.0, "dominant frequency {freq} Hz");
    assert!(level > 0.02, "real energy expected, rms {level}");

    // ffmpeg as an independent HLS consumer reads the live playlist itself.
    let (codec, rate, _) = ffprobe_audio(&media_url);
    assert_eq!((codec.as_str(), rate), ("opus", 48_000));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_regions_are_mixed_into_one_program() {
    let mesh = DevMesh::start(11_000, "spine-two");
    let (room, _host, hls_url) = mesh.create_room("two regions");
    let us = mesh.route(&room, "us-east");
    let eu = mesh.route(&room, "eu-west");
    assert_ne!(us["whip_url"], eu["whip_url"]);
    let t1 = mesh.token(&room, "speaker", "us-440");
    let t2 = mesh.token(&room, "speaker", "eu-660");
    let w1 = us["whip_url"].as_str().unwrap().to_string();
    let w2 = eu["whip_url"].as_str().unwrap().to_string();
    tokio::join!(
        publish_tone(&w1, &t1, 440.0, 7.0),
        publish_tone(&w2, &t2, 660.0, 7.0)
    );

    let media_url = tokio::task::spawn_blocking(move || media_playlist_url(&hls_url))
        .await
        .unwrap();
    let u = media_url.clone();
    let text =
        tokio::task::spawn_blocking(move || wait_for_segments(&u, 3, Duration::from_secs(20)))
            .await
            .unwrap();
    let dir = mesh.data_dir.parent().unwrap().to_path_buf();
    let (file, _, _) = download_media(&media_url, &text, &dir);
    let samples = ffmpeg_decode(file.to_str().unwrap());
    let win = loudest_window(&samples, 24_000);
    let p440 = tone_power(win, 440.0);
    let p660 = tone_power(win, 660.0);
    let p550 = tone_power(win, 550.0);
    assert!(
        p440 > 50.0 * p550,
        "440 Hz missing: 440={p440:e} 550={p550:e}"
    );
    assert!(
        p660 > 50.0 * p550,
        "660 Hz missing: 660={p660:e} 550={p550:e}"
    );
    assert!(
        p440 / p660 < 10.0 && p660 / p440 < 10.0,
        "unbalanced mix {p440:e} vs {p660:e}"
    );
}

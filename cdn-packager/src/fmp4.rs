//! CMAF fMP4 muxing of the Opus program stream with `mp4-atom`.
//!
//! `init.mp4` follows "Encapsulation of Opus in ISO Base Media File Format" (v0.8.1): an `Opus`
//! sample entry (channelcount = OutputChannelCount, samplesize 16, samplerate 48000<<16) with a
//! `dOps` box, an edit list whose `media_time` is the pre-skip (segment_duration 0 because the
//! length of a live stream is unknown), and a `roll` sample group (roll_distance -4: 80 ms of
//! pre-roll in 20 ms samples) described in `stbl` and mapped in every `traf`.
//!
//! Every part is one CMAF chunk: `[styp] moof mdat`; only the first part of a segment carries the
//! `styp`, so a segment is exactly the concatenation of its parts.

use amphi_protocol::audio::{FRAME_SAMPLES, OPUS_PRE_SKIP, PROGRAM_CHANNELS, SAMPLE_RATE};
use mp4_atom::{
    Audio, Codec, Dinf, Dops, Dref, DrefEntry, Edts, Elst, ElstEntry, Encode, Esds, FixedPoint,
    FourCC, Ftyp, Hdlr, Mdhd, Mdia, Mfhd, Minf, Moof, Moov, Mp4a, Mvex, Mvhd, Opus, Sbgp,
    SbgpEntry, Sgpd, SgpdEntry, Smhd, Stbl, Stco, Stsd, Styp, Tfdt, Tfhd, Tkhd, Traf, Trak, Trex,
    Trun, TrunEntry, TrunSamples, Url,
};

/// The only track in our files.
pub const TRACK_ID: u32 = 1;
/// Media timescale: 48 kHz, one tick per sample.
pub const TIMESCALE: u32 = SAMPLE_RATE;
/// Duration of one Opus sample (one 20 ms packet) in timescale ticks.
pub const SAMPLE_DURATION: u32 = FRAME_SAMPLES as u32;
/// `sample_depends_on = 2` (no other sample needed): every Opus packet is a sync sample.
pub const SYNC_SAMPLE_FLAGS: u32 = 0x0200_0000;
/// Opus needs 80 ms of pre-roll after random access: four 20 ms samples.
pub const ROLL_DISTANCE: i16 = -4;

const ROLL: FourCC = FourCC::new(b"roll");
const MDAT_HEADER_LEN: usize = 8;

/// Why a box could not be written.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    /// `mp4-atom` refused to encode a box.
    #[error("mp4 encode: {0}")]
    Encode(#[from] mp4_atom::Error),
    /// A chunk is larger than a 32-bit box can describe.
    #[error("chunk too large")]
    TooLarge,
}

fn roll_group() -> Sgpd {
    Sgpd {
        grouping_type: ROLL,
        default_length: Some(2),
        default_group_description_index: None,
        static_group_description: false,
        static_mapping: false,
        essential: false,
        entries: vec![SgpdEntry {
            description_length: Some(2),
            entry: mp4_atom::AnySampleGroupEntry::UnknownGroupingType(
                ROLL,
                ROLL_DISTANCE.to_be_bytes().to_vec(),
            ),
        }],
    }
}

/// The Opus sample entry, per the Opus-in-ISOBMFF spec section 4.3.1/4.3.2.
pub fn opus_sample_entry() -> Opus {
    Opus {
        audio: Audio {
            data_reference_index: 1,
            channel_count: PROGRAM_CHANNELS as u16,
            sample_size: 16,
            sample_rate: FixedPoint::new(SAMPLE_RATE as u16, 0),
        },
        dops: Dops {
            output_channel_count: PROGRAM_CHANNELS,
            pre_skip: OPUS_PRE_SKIP,
            input_sample_rate: SAMPLE_RATE,
            output_gain: 0,
            channel_mapping: None,
        },
        btrt: None,
    }
}

/// Samples of 48 kHz audio per AAC-LC frame.
pub const AAC_FRAME_SAMPLES: u32 = 1024;

/// The AAC-LC sample entry (`mp4a` + `esds`, object type 0x40 = MPEG-4 audio) for the
/// AudioSpecificConfig `asc` the encoder reported.
pub fn aac_sample_entry(asc: &[u8], bitrate: u32) -> Mp4a {
    use mp4_atom::esds::{DecoderConfig, DecoderSpecific, EsDescriptor, SLConfig};
    let (profile, freq_index, chan_conf) = match asc {
        [a, b, ..] => (a >> 3, ((a & 7) << 1) | (b >> 7), (b >> 3) & 0x0f),
        _ => (2, 3, 1),
    };
    Mp4a {
        audio: Audio {
            data_reference_index: 1,
            channel_count: PROGRAM_CHANNELS as u16,
            sample_size: 16,
            sample_rate: FixedPoint::new(SAMPLE_RATE as u16, 0),
        },
        esds: Esds {
            es_desc: EsDescriptor {
                es_id: 0,
                dec_config: DecoderConfig {
                    object_type_indication: 0x40,
                    stream_type: 5,
                    up_stream: 0,
                    buffer_size_db: Default::default(),
                    max_bitrate: bitrate,
                    avg_bitrate: bitrate,
                    dec_specific: Some(DecoderSpecific {
                        profile,
                        freq_index,
                        chan_conf,
                        raw: asc.to_vec(),
                    }),
                },
                sl_config: SLConfig::default(),
                ..Default::default()
            },
        },
        btrt: None,
        taic: None,
    }
}

/// Write the Opus initialization segment (`ftyp` + `moov`).
pub fn init_segment() -> Result<Vec<u8>, MuxError> {
    init_with(
        Codec::Opus(opus_sample_entry()),
        u64::from(OPUS_PRE_SKIP),
        SAMPLE_DURATION,
        true,
    )
}

/// Write the AAC-LC initialization segment; `delay` is the encoder delay in samples (the edit
/// list skips it, like the Opus pre-skip).
pub fn init_segment_aac(asc: &[u8], bitrate: u32, delay: u32) -> Result<Vec<u8>, MuxError> {
    init_with(
        Codec::Mp4a(aac_sample_entry(asc, bitrate)),
        u64::from(delay),
        AAC_FRAME_SAMPLES,
        false,
    )
}

fn init_with(
    codec: Codec,
    media_time: u64,
    sample_duration: u32,
    roll: bool,
) -> Result<Vec<u8>, MuxError> {
    let ftyp = Ftyp {
        major_brand: b"iso6".into(),
        minor_version: 0,
        compatible_brands: vec![b"iso6".into(), b"cmfc".into(), b"mp41".into()],
    };
    let stbl = Stbl {
        stsd: Stsd {
            codecs: vec![codec],
        },
        stco: Some(Stco::default()),
        sgpd: if roll { vec![roll_group()] } else { vec![] },
        sbgp: if roll {
            vec![Sbgp {
                grouping_type: ROLL,
                grouping_type_parameter: None,
                entries: vec![],
            }]
        } else {
            vec![]
        },
        ..Default::default()
    };
    let trak = Trak {
        tkhd: Tkhd {
            track_id: TRACK_ID,
            enabled: true,
            in_movie: true,
            volume: 1.into(),
            ..Default::default()
        },
        edts: Some(Edts {
            elst: Some(Elst {
                entries: vec![ElstEntry {
                    segment_duration: 0,
                    media_time: Some(media_time),
                    media_rate: 1.into(),
                }],
            }),
        }),
        mdia: Mdia {
            mdhd: Mdhd {
                timescale: TIMESCALE,
                language: "und".into(),
                ..Default::default()
            },
            hdlr: Hdlr {
                handler: b"soun".into(),
                name: "amphi program".into(),
            },
            minf: Minf {
                smhd: Some(Smhd::default()),
                dinf: Dinf {
                    dref: Dref {
                        entries: vec![DrefEntry::Url(Url::default())],
                    },
                },
                stbl,
                ..Default::default()
            },
        },
        ..Default::default()
    };
    let moov = Moov {
        mvhd: Mvhd {
            timescale: TIMESCALE,
            rate: 1.into(),
            volume: 1.into(),
            next_track_id: TRACK_ID + 1,
            ..Default::default()
        },
        mvex: Some(Mvex {
            mehd: None,
            trex: vec![Trex {
                track_id: TRACK_ID,
                default_sample_description_index: 1,
                default_sample_duration: sample_duration,
                default_sample_size: 0,
                default_sample_flags: SYNC_SAMPLE_FLAGS,
            }],
        }),
        trak: vec![trak],
        ..Default::default()
    };
    let mut out = Vec::with_capacity(1024);
    ftyp.encode(&mut out)?;
    moov.encode(&mut out)?;
    Ok(out)
}

/// Writes CMAF chunks; owns the running `mfhd` sequence number.
#[derive(Debug)]
pub struct ChunkWriter {
    sequence: u32,
    sample_duration: u32,
    roll: bool,
}

impl Default for ChunkWriter {
    fn default() -> Self {
        ChunkWriter {
            sequence: 1,
            sample_duration: SAMPLE_DURATION,
            roll: true,
        }
    }
}

impl ChunkWriter {
    /// A writer for AAC-LC chunks (1024-sample frames, no roll group).
    pub fn aac() -> Self {
        ChunkWriter {
            sequence: 1,
            sample_duration: AAC_FRAME_SAMPLES,
            roll: false,
        }
    }

    /// Append one chunk to `out`: `[styp] moof mdat` holding `sizes.len()` samples of the
    /// writer's sample duration (Opus: [`SAMPLE_DURATION`]) whose bytes are `payload` (concatenated in order), decoding from
    /// `base_media_decode_time`.
    pub fn write_chunk(
        &mut self,
        base_media_decode_time: u64,
        sizes: &[u32],
        payload: &[u8],
        with_styp: bool,
        out: &mut Vec<u8>,
    ) -> Result<(), MuxError> {
        if with_styp {
            Styp {
                major_brand: b"msdh".into(),
                minor_version: 0,
                compatible_brands: vec![b"msdh".into(), b"cmfs".into(), b"iso6".into()],
            }
            .encode(out)?;
        }
        let count = u32::try_from(sizes.len()).map_err(|_| MuxError::TooLarge)?;
        let mut moof = Moof {
            mfhd: Mfhd {
                sequence_number: self.sequence,
            },
            traf: vec![Traf {
                tfhd: Tfhd {
                    track_id: TRACK_ID,
                    default_sample_duration: Some(self.sample_duration),
                    default_sample_flags: Some(SYNC_SAMPLE_FLAGS),
                    default_base_is_moof: true,
                    ..Default::default()
                },
                tfdt: Some(Tfdt {
                    base_media_decode_time,
                }),
                trun: vec![Trun {
                    data_offset: Some(0),
                    samples: TrunSamples::Explicit(
                        sizes
                            .iter()
                            .map(|&s| TrunEntry {
                                size: Some(s),
                                ..Default::default()
                            })
                            .collect(),
                    ),
                }],
                sbgp: if self.roll {
                    vec![Sbgp {
                        grouping_type: ROLL,
                        grouping_type_parameter: None,
                        entries: vec![SbgpEntry {
                            sample_count: count,
                            group_description_index: 1,
                        }],
                    }]
                } else {
                    vec![]
                },
                ..Default::default()
            }],
        };
        // The data offset is relative to the moof start; its width is fixed, so measure once.
        let moof_start = out.len();
        moof.encode(out)?;
        let moof_len = out.len() - moof_start;
        out.truncate(moof_start);
        let data_offset =
            i32::try_from(moof_len + MDAT_HEADER_LEN).map_err(|_| MuxError::TooLarge)?;
        moof.traf[0].trun[0].data_offset = Some(data_offset);
        moof.encode(out)?;
        let mdat_len =
            u32::try_from(MDAT_HEADER_LEN + payload.len()).map_err(|_| MuxError::TooLarge)?;
        out.extend_from_slice(&mdat_len.to_be_bytes());
        out.extend_from_slice(b"mdat");
        out.extend_from_slice(payload);
        self.sequence = self.sequence.wrapping_add(1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mp4_atom::{Any, Decode};
    use std::io::Cursor;

    #[test]
    fn init_segment_decodes_with_opus_entry_per_spec() {
        let init = init_segment().unwrap();
        let mut cur = Cursor::new(init.as_slice());
        let ftyp = Any::decode(&mut cur).unwrap();
        assert!(matches!(ftyp, Any::Ftyp(_)));
        let Any::Moov(moov) = Any::decode(&mut cur).unwrap() else {
            panic!("no moov")
        };
        let trak = &moov.trak[0];
        assert_eq!(trak.mdia.mdhd.timescale, 48_000);
        assert_eq!(trak.mdia.hdlr.handler, FourCC::new(b"soun"));
        let Codec::Opus(opus) = &trak.mdia.minf.stbl.stsd.codecs[0] else {
            panic!("not opus")
        };
        assert_eq!(opus.audio.channel_count, 1);
        assert_eq!(opus.audio.sample_size, 16);
        assert_eq!(opus.audio.sample_rate.integer(), 48_000);
        assert_eq!(opus.dops.output_channel_count, 1);
        assert_eq!(opus.dops.pre_skip, OPUS_PRE_SKIP);
        assert_eq!(opus.dops.input_sample_rate, 48_000);
        assert_eq!(opus.dops.channel_mapping, None);
        let elst = trak.edts.as_ref().unwrap().elst.as_ref().unwrap();
        assert_eq!(elst.entries[0].media_time, Some(312));
        assert_eq!(
            moov.mvex.as_ref().unwrap().trex[0].default_sample_duration,
            960
        );
    }

    #[test]
    fn chunk_points_into_its_mdat() {
        let mut w = ChunkWriter::default();
        let mut out = Vec::new();
        w.write_chunk(96_000, &[3, 2], &[1, 2, 3, 4, 5], true, &mut out)
            .unwrap();
        let mut cur = Cursor::new(out.as_slice());
        assert!(matches!(Any::decode(&mut cur).unwrap(), Any::Styp(_)));
        let moof_start = cur.position() as usize;
        let Any::Moof(moof) = Any::decode(&mut cur).unwrap() else {
            panic!("no moof")
        };
        let traf = &moof.traf[0];
        assert_eq!(traf.tfdt.as_ref().unwrap().base_media_decode_time, 96_000);
        let off = traf.trun[0].data_offset.unwrap() as usize;
        assert_eq!(&out[moof_start + off..], &[1, 2, 3, 4, 5]);
        assert_eq!(moof.mfhd.sequence_number, 1);
        let Any::Mdat(mdat) = Any::decode(&mut cur).unwrap() else {
            panic!("no mdat")
        };
        assert_eq!(mdat.data, vec![1, 2, 3, 4, 5]);
        let mut second = Vec::new();
        w.write_chunk(96_960, &[1], &[9], false, &mut second)
            .unwrap();
        let Any::Moof(moof) = Any::decode(&mut Cursor::new(second.as_slice())).unwrap() else {
            panic!("second chunk must start with moof")
        };
        assert_eq!(moof.mfhd.sequence_number, 2);
    }
}

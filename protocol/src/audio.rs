//! Audio timing constants shared by the mixer and the packager.

use std::time::Duration;

/// Opus always runs at 48 kHz in amphi (RTP clock rate for Opus is 48 kHz too).
pub const SAMPLE_RATE: u32 = 48_000;
/// One Opus frame: 20 ms.
pub const FRAME_DURATION: Duration = Duration::from_millis(20);
/// Samples per channel in one 20 ms frame at 48 kHz.
pub const FRAME_SAMPLES: usize = 960;
/// Program stream channel count (mono).
pub const PROGRAM_CHANNELS: u8 = 1;
/// Program stream bitrate in bits per second.
pub const PROGRAM_BITRATE: i32 = 64_000;
/// Opus encoder pre-skip reported by libopus at 48 kHz (samples); written into `dOps`.
pub const OPUS_PRE_SKIP: u16 = 312;
/// Frames in one LL-HLS part (200 ms).
pub const FRAMES_PER_PART: u32 = 10;
/// Parts in one segment (2 s).
pub const PARTS_PER_SEGMENT: u32 = 10;

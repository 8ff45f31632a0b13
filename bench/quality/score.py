#!/usr/bin/env python3
"""Score degraded speech against a reference with ITU-T P.862 PESQ wide-band.

Usage: score.py REF.wav LABEL=DEGRADED.wav [LABEL=DEGRADED.wav ...]

Every file is resampled to 16 kHz mono by ffmpeg, the degraded signal is aligned to the
reference by cross-correlation (FFT) and cut to the reference's length, then scored with the
`pesq` package (wide-band mode). Prints one line per file: `LABEL<TAB>PESQ<TAB>offset_ms`, and
`LABEL<TAB>error<TAB>reason` for a file that could not be scored.
"""
import subprocess
import sys

import numpy as np
from pesq import pesq

RATE = 16000


def load(path):
    raw = subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", path,
         "-ac", "1", "-ar", str(RATE), "-f", "s16le", "-"],
        check=True, capture_output=True).stdout
    return np.frombuffer(raw, dtype=np.int16).astype(np.float64) / 32768.0


def align(ref, deg):
    """Return deg shifted so it lines up with ref, same length, and the shift in samples."""
    n = 1
    while n < len(ref) + len(deg):
        n *= 2
    corr = np.fft.irfft(np.fft.rfft(deg, n) * np.conj(np.fft.rfft(ref, n)), n)
    lag = int(np.argmax(corr))
    if lag > n // 2:
        lag -= n
    out = np.zeros(len(ref))
    if lag >= 0:
        seg = deg[lag:lag + len(ref)]
        out[:len(seg)] = seg
    else:
        seg = deg[:len(ref) + lag]
        out[-lag:-lag + len(seg)] = seg
    return out, lag


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    ref = load(sys.argv[1])
    for arg in sys.argv[2:]:
        label, _, path = arg.partition("=")
        try:
            deg, lag = align(ref, load(path))
            score = pesq(RATE, ref, deg, "wb")
            print(f"{label}\t{score:.2f}\t{lag * 1000 / RATE:.0f}")
        except Exception as e:  # one bad file must not hide the other rows
            print(f"{label}\terror\t{e}")


if __name__ == "__main__":
    main()

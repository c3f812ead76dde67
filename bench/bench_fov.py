"""Benchmark: one 1920x1080 FOV scored end to end, against skimage's rgb2hed on the same image.

Run: ``python -m bench.bench_fov [--repeats N]``. Prints the median time of ``score_fov`` (40x and 20x pixel
sizes), of the overlay rendering, of one ``skimage.color.rgb2hed`` call on the same image in the same run, their
ratio (goal: ≤ 0.5), and the peak memory of one scoring call (traced NumPy allocations, and the process's peak
resident set size).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import numpy.typing as npt
from skimage.color import rgb2hed

from her2scope.config.scoring import ScoringParams
from her2scope.scoring import analyse_fov, calibrate_from_control, score_fov
from her2scope.scoring.overlay import render_overlay

SAMPLES = Path(__file__).resolve().parent.parent / "samples"


def _median_ms(function: Callable[[], object], repeats: int) -> float:
    function()  # warm-up: first-call allocations and OpenCV dispatch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)


def _load(name: str) -> npt.NDArray[np.uint8]:
    bgr = cv2.imread(str(SAMPLES / name))
    if bgr is None:
        raise SystemExit(f"cannot read {SAMPLES / name}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)  # type: ignore[return-value]


def main() -> None:
    """Run the benchmark and print its figures."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    params = ScoringParams()
    image = _load("her2_3plus.jpg")
    control = calibrate_from_control(_load("control_3plus.jpg"), 0.25, params)
    assert image.shape == (1080, 1920, 3)

    rgb2hed_ms = _median_ms(lambda: rgb2hed(image), args.repeats)
    fov40_ms = _median_ms(lambda: score_fov(image, 0.25, params, control=control), args.repeats)
    fov20_ms = _median_ms(lambda: score_fov(image, 0.5, params, control=control), args.repeats)
    analysis = analyse_fov(image, 0.25, params, control=control)
    overlay_ms = _median_ms(lambda: render_overlay(analysis), max(5, args.repeats // 3))

    rss_before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    score_fov(image, 0.5, params, control=control)
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    print(f"image: samples/her2_3plus.jpg {image.shape[1]}x{image.shape[0]}, OpenCV threads {cv2.getNumThreads()}")
    print(f"skimage rgb2hed                      median {rgb2hed_ms:7.1f} ms")
    print(f"score_fov at 40x (0.25 µm/px)        median {fov40_ms:7.1f} ms   ratio {fov40_ms / rgb2hed_ms:.2f}")
    print(f"score_fov at 20x (0.5 µm/px)         median {fov20_ms:7.1f} ms   ratio {fov20_ms / rgb2hed_ms:.2f}")
    print(f"render_overlay (all layers, 40x)     median {overlay_ms:7.1f} ms")
    print(f"peak traced NumPy memory, one 20x FOV: {traced_peak / 2**20:.1f} MiB")
    print(f"process peak RSS: {rss_peak_kib / 1024:.0f} MiB (before that call: {rss_before_kib / 1024:.0f} MiB)")
    print(f"goal ratio <= 0.5 at 40x: {'met' if fov40_ms / rgb2hed_ms <= 0.5 else 'NOT met'}")


if __name__ == "__main__":
    main()

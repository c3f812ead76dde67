"""Bounds on what a client (or an input file) can make her2scope hold: each is refused with a clear error beyond it.

The daemon runs for days on the microscope's PC; without these, one request or one file could block its loop for
seconds or take gigabytes of memory (see docs/protocol.md, "Limits").
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class LimitsConfig(BaseModel):
    """Per-request, per-client and per-case bounds of the daemon, and the pixel bound of decoded images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_request_kib: int = Field(
        1024,
        ge=1,
        le=65536,
        description="A control request frame larger than this many KiB is refused (a 10,000-vertex polygon is "
        "about 250 KiB)",
    )
    max_polygon_vertices: int = Field(
        10_000, ge=3, le=1_000_000, description="A ROI or region polygon with more vertices is refused"
    )
    max_unread_replies: int = Field(
        16,
        ge=1,
        le=10_000,
        description="Replies a control client may leave unread; further requests from it are answered 'busy' "
        "(ZeroMQ high-water mark of the control socket)",
    )
    max_queued_jobs: int = Field(
        500,
        ge=1,
        le=100_000,
        description="FOVs waiting to be scored; a re-score that would queue more is refused 'busy' (a FOV queued "
        "twice is queued once)",
    )
    max_audit_entries: int = Field(
        10_000, ge=1, le=1_000_000, description="Adjustments in one case's audit trail; further ones are refused"
    )
    max_image_megapixels: float = Field(
        100.0,
        gt=0.0,
        le=1000.0,
        description="An image file of more megapixels is refused before it is decoded (a 1080p frame is 2.1)",
    )

    @property
    def max_request_bytes(self) -> int:
        """``max_request_kib`` in bytes."""
        return self.max_request_kib * 1024

    @property
    def max_image_pixels(self) -> int:
        """``max_image_megapixels`` in pixels."""
        return int(self.max_image_megapixels * 1_000_000)

"""The video object (OpenAI's, with Lumenfall's metadata), for `GET videos/{id}` and for the job's webhook events,
which carry it exactly as that route shows it."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from billing import videos
from billing.videos import EventData
from gateway.keys import SETTINGS
from gateway.render import usd_number


def _epoch(value: Any) -> int | None:
    return int(value.timestamp()) if value is not None else None


def video_object(job: dict[str, Any], base: str) -> dict[str, Any]:
    """The object for `job`; `base` is where the video routes live (`https://host/v1`), for its content URL."""
    # Who made it, as Lumenfall shows it: the provider, the model id it was sent and its own id for the job.
    metadata: dict[str, Any] = {"request_id": job["request_id"], "provider": job["provider"] or job["upstream"],
                                "executed_model": job["provider_model"] or job["model"],
                                "upstream_id": job["upstream_id"]}
    if job["status"] in videos.UNFINISHED:
        metadata.update(cost_estimate_micros=job["price_micros"], cost_estimate=usd_number(job["price_micros"]))
    else:
        cost = job["cost_micros"] or 0
        metadata.update(cost_micros=cost, cost=usd_number(cost))
    video: dict[str, Any] = {
        "id": job["id"], "object": "video", "model": job["model"], "status": job["status"],
        "progress": job["progress"], "created_at": _epoch(job["created_at"]),
        "completed_at": _epoch(job["completed_at"]), "expires_at": None, "prompt": job["prompt"],
        "seconds": str(job["seconds"]), "size": job["size"], "error": job["error"], "metadata": metadata,
    }
    if job["status"] == "completed":
        video["output"] = {"url": f"{base}/videos/{job['id']}/content", "content_type": "video/mp4"}
    return video


def event_data(app: web.Application) -> EventData:
    """The data of a job's webhook events: its object as `GET {public_url}/v1/videos/{id}` shows it."""
    base = app[SETTINGS].base_url() + "/v1"
    return lambda job: video_object(job, base)

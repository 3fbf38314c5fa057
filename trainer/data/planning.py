"""From a checked dataset to what training sees: one item per image, resolution and aspect bucket (no torch)."""

from __future__ import annotations

import dataclasses

from trainer.data.buckets import BucketPlan, plan_buckets
from trainer.data.datasets import TrainItem, collect_items
from trainer.data.health_report import HealthReport, usable_images
from trainer.data.pairs import pairs_report, place_references
from trainer.spec import JobSpec


def plan_training_items(spec: JobSpec, health: HealthReport) -> tuple[list[TrainItem], BucketPlan]:
    """The placed items (bucket set, resolution of the placement) and the plan whose report users read."""
    data = spec.data
    images = collect_items(spec, set(usable_images(health)))
    resolutions = sorted({r for item in images for r in item.resolutions})
    # Buckets are bounded by their aspect ratio; the smallest side only by the step, so small images still fit.
    plan = plan_buckets(images, resolutions, sizes=health.sizes, step=data.bucket_step, max_upscale=data.max_upscale,
                        batch_size=spec.train.batch_size, min_side=data.bucket_step)
    items = [dataclasses.replace(images[p.item_index], resolution=p.resolution, bucket=p.bucket)
             for p in plan.placements]
    if any(entry.conditioning for entry in data.datasets):  # edit pairs: where each reference goes
        items = place_references(items, spec, health.reference_sizes)
        plan.notes += pairs_report(items, spec)
    return items, plan

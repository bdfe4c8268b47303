"""The `heal-variant` flow: one pruned variant healed (QLoRA) as its own run on the `gpu` pool.

    prune-and-heal (holds its gpu slots) ── evaluates every unhealed variant ──► releases them
        └─ run_deployment(heal-variant/default) × variants, in parallel ─► each: gpu slots, heal
    prune-and-heal ── takes its slots again ─► evaluates the healed variants in its own process

Healing takes hours per variant on a GPU; as separate runs, one model's variants heal side by
side on as many GPUs as the `gpu` limit and the pool's workers allow. Chosen with
`heal.dispatch = "deployment"` (default "inline": the demo and the tests run without a
deployment). The parent gives its slots back while it waits, so its children can always take
them (tasks/gpus.py); it still occupies its own worker, so the pool needs a second GPU worker.
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment

from layerprune.config import HealSpec, ModelSpec
from tasks.gpus import gpu_job, gpu_slots
from tasks.heal import heal_variant
from tasks.results import use_artifact_store

HEAL_DEPLOYMENT = "heal-variant/default"  # deployments/prefect.yaml


# The manifest is persisted as JSON in the artifact store, so the parent reads it back.
@flow(name="heal-variant", log_prints=True, persist_result=True, result_serializer="json")
def heal_one(store_root: str, model: ModelSpec, model_info: dict, recipe: dict,
             spec: HealSpec) -> dict:
    """Heal the variant `recipe` of `model` (tasks.heal.heal_variant); its manifest."""
    use_artifact_store(store_root)
    with gpu_slots():
        return heal_variant(store_root, model, model_info, recipe, spec)


@task(name="dispatch-heal", task_run_name="dispatch-heal-{label}", cache_policy=NO_CACHE)
def run_heal(store_root: str, model: ModelSpec, model_info: dict, recipe: dict,
             spec: HealSpec, gpu_count: int, label: str) -> dict:
    """Run `heal-variant/default` for one variant and wait; the heal stage's manifest."""
    run = run_deployment(HEAL_DEPLOYMENT, poll_interval=5, **gpu_job(gpu_count), parameters={
        "store_root": store_root, "model": model.model_dump(mode="json"),
        "model_info": model_info, "recipe": recipe, "spec": spec.model_dump(mode="json")})
    state = run.state
    if state is None or not state.is_completed():
        raise RuntimeError(f"heal {label}: flow run {run.name} ({run.id}) ended "
                           f"{state.name if state else 'without a state'}: "
                           f"{state.message if state else ''}")
    get_run_logger().info("heal %s: flow run %s completed", label, run.name)
    return state.result()


def heal_in_deployments(store_root: str, model: ModelSpec, model_info: dict,
                        recipes: list[dict], spec: HealSpec, gpu_count: int) -> list[dict]:
    """Heal every recipe as its own `heal-variant` run, all at once; manifests in order."""
    futures = [run_heal.submit(store_root, model, model_info, r, spec, gpu_count,
                               f"{r['meta']['strategy']}-n{r['meta']['n']}") for r in recipes]
    return [f.result() for f in futures]

"""One resume policy for both trainers.

A trainer run again into a run directory that holds checkpoints resumes from the latest (`--resume` requires
one, `--no-resume` refuses to mix with them unless `--overwrite`). What runs is the saved config with the new
one's changes to *safe* keys applied (each trainer lists them: the schedule's length, logging and checkpoint
frequency, time bounds); a change to any other key would silently not take effect (the optimiser, schedule and
data order come from the checkpoint), so it is refused in one line naming each key, old and new. The run's
`config.yaml` always equals what runs.
"""

from __future__ import annotations

from l2c.errors import L2CError


class ResumeError(L2CError):
    """A run directory that cannot be resumed with the given inputs or settings."""


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _safe(key: str, safe: tuple[str, ...]) -> bool:
    return any(key == s or key.startswith(s + ".") for s in safe)


def check_changes(saved: dict, now: dict, safe: tuple[str, ...], where: str, defaults: dict | None = None) -> dict:
    """Compare the config a run was started with (`saved`) with this invocation's (`now`), both as nested dicts;
    a key the saved config lacks (a run from before the key existed) counts as its default in `defaults`.
    Returns {key: (old, new)} of the safe keys that changed (they apply from here on); refuses any other change."""
    a, b, d = flatten(saved), flatten(now), flatten(defaults or {})
    old = {k: a.get(k, d.get(k)) for k in set(a) | set(b)}
    changed = {k: (old[k], b.get(k)) for k in sorted(old) if old[k] != b.get(k)}
    locked = {k: v for k, v in changed.items() if not _safe(k, safe)}
    if locked:
        what = "; ".join(f"{k}: run {old!r}, now {new!r}" for k, (old, new) in locked.items())
        raise ResumeError(
            f"{where} was trained with other settings ({what}); these cannot change on resume. Rerun with the "
            f"run's own values, or use a new --out (may change: {', '.join(safe)})"
        )
    return {k: v for k, v in changed.items() if _safe(k, safe)}

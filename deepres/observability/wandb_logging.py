"""Weights & Biases logging: one wandb run per job, across ranks, resumes and requeues.

    wandb:                      # the `wandb:` section of a deepres YAML (WandbConfig)
      project: deepres
      group: depth-sweep
      tags: [highway, digits]
      mode: auto                # online with credentials, else offline (no prompt, no network wait)

`make_wandb_logger(cfg, run_dir, run_config)` returns Lightning's WandbLogger (or None when off):
  - only rank 0 creates the run: Lightning's WandbLogger creates it lazily in `experiment`, which
    returns a dummy on every other rank (the one-run-per-GPU reports, Lightning #11380/#13166, came
    from accessing it before the rank was known, e.g. under ddp_spawn);
  - the run id lives in `run_dir/wandb_run_id`, so a resumed or requeued job continues the same run
    (`id=…, resume="allow"`), and wandb's files go to `run_dir/wandb/`;
  - the run's config holds the resolved deepres config plus git SHA and package versions;
  - offline runs print the `wandb sync …` command when training ends;
  - before a SLURM requeue the session is finished and wandb's service stopped (`finish_before_requeue`):
    the requeue's SIGTERM reaches that service too, so each attempt's steps are in the run exactly once.
"""

from __future__ import annotations

import contextlib
import netrc
import os
import secrets
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_only, rank_zero_warn

from deepres.errors import ConfigError
from deepres.files import atomic_write_bytes
from deepres.lightning_compat import DummyExperiment, wandb_init_arguments

RUN_ID_FILE = "wandb_run_id"
WandbMode = Literal["auto", "online", "offline", "disabled"]


@dataclass
class WandbConfig:
    """Where and how a run is logged to Weights & Biases."""

    enabled: bool = True
    """Log to wandb at all. false: no wandb run (the CSV log in the run directory is still written)."""
    project: str = "deepres"
    """wandb project (WANDB_PROJECT is not consulted: the YAML says where runs go)."""
    entity: str | None = None
    """wandb user or team; null: the default entity of the credentials."""
    group: str | None = None
    """Group runs together in the UI, e.g. one depth sweep."""
    tags: list[str] = field(default_factory=list)
    """Free-form tags shown and filterable in the UI."""
    name: str | None = None
    """Display name of the run; null: the run directory's name."""
    mode: WandbMode = "auto"
    """auto: WANDB_MODE if set, else online with credentials (WANDB_API_KEY or ~/.netrc), else offline.
    offline: write to run_dir/wandb/ and sync later with `wandb sync`. disabled: same as enabled: false."""
    log_model: bool = False
    """Upload checkpoints as wandb artifacts (they can be large; the run directory keeps them anyway)."""
    quiet: bool = True
    """Keep wandb's own console output to warnings and errors: no start banner and no per-metric history and
    summary at the end (~30 lines); deepres prints the run's id and where it is (URL, or the sync command)."""


# ----------------------------------------------------------------------------------------------
# Mode and credentials
# ----------------------------------------------------------------------------------------------
def has_credentials() -> bool:
    """An API key in the environment or a ~/.netrc entry for the wandb host; never prompts."""
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    path = Path(os.environ.get("NETRC", "~/.netrc")).expanduser()
    try:
        return path.is_file() and netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(mode: str) -> str:
    """online | offline | disabled for a configured mode (see WandbConfig.mode)."""
    if mode not in ("auto", "online", "offline", "disabled"):
        raise ConfigError(f"wandb.mode must be auto, online, offline or disabled; got {mode!r}.")
    if mode == "auto":
        env = os.environ.get("WANDB_MODE", "").strip().lower()
        if env:
            mode = {"dryrun": "offline", "run": "online"}.get(env, env)
        elif os.environ.get("WANDB_DISABLED", "").lower() in ("1", "true", "yes"):
            mode = "disabled"
        else:
            mode = "online" if has_credentials() else "offline"
    if mode == "online" and not has_credentials():
        raise ConfigError(
            "wandb mode is online but no wandb credentials were found (WANDB_API_KEY, ~/.netrc). "
            "Fix: run `wandb login` or set WANDB_API_KEY, or set wandb.mode: offline (sync later) or auto."
        )
    if mode not in ("online", "offline", "disabled"):
        raise ConfigError(f"WANDB_MODE={os.environ.get('WANDB_MODE')!r} is not a mode deepres knows; "
                          "use online, offline or disabled.")
    return mode


# ----------------------------------------------------------------------------------------------
# Run id
# ----------------------------------------------------------------------------------------------
def run_id_for(run_dir: Path) -> str | None:
    """The wandb run id of this run directory, created by rank 0 on first use.

    Other ranks only read it (they never create a wandb run, so None is fine for them)."""
    path = run_dir / RUN_ID_FILE
    if path.is_file():
        return path.read_text().strip() or None
    if rank_zero_only.rank != 0:
        return None
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    atomic_write_bytes(path, (run_id + "\n").encode())
    return run_id


# ----------------------------------------------------------------------------------------------
# The logger
# ----------------------------------------------------------------------------------------------
class DeepresWandbLogger(WandbLogger):
    """Lightning's WandbLogger that, for an offline run, prints how to upload it when training ends."""

    _sync_hint_printed = False

    def __init__(self, **kwargs: Any):
        super().__init__(**kwargs)
        # Lightning always passes `anonymous`; wandb >= 0.19 warns that it has no effect.
        init = wandb_init_arguments(self)
        if init.get("anonymous") is None:
            init.pop("anonymous", None)

    @property
    def experiment(self):
        """The wandb run; if wandb cannot start it, training goes on without wandb (dashboards must
        never end a training job: metrics.csv and depth.jsonl in the run directory have everything)."""
        try:
            return WandbLogger.experiment.fget(self)
        except Exception as err:  # wandb raises several unrelated types (service, network, usage)
            rank_zero_warn(f"wandb: could not start run {self._id}: {type(err).__name__}: {err}. Training goes on "
                           "without wandb; metrics.csv and depth.jsonl in the run directory have every metric.")
            self._experiment = DummyExperiment()
            return self._experiment

    def _lost(self, err: BaseException) -> None:
        """wandb's service is gone (e.g. SLURM's SIGTERM reached it as well as training): training goes on
        without wandb, with one warning, and wandb's own exit hook is not left to fail at interpreter exit."""
        rank_zero_warn(f"wandb: run {self._id} lost its wandb service ({type(err).__name__}: {err}); training goes "
                       "on without wandb. What it logged until now is kept; metrics.csv has every metric.")
        self._experiment = DummyExperiment()
        import wandb

        with contextlib.suppress(Exception):
            wandb.teardown(exit_code=1)

    @rank_zero_only
    def log_metrics(self, metrics: Any, step: int | None = None) -> None:
        if isinstance(self._experiment, DummyExperiment):
            return
        try:
            super().log_metrics(metrics, step)
        except Exception as err:  # a dashboard call must never end the job
            self._lost(err)

    @rank_zero_only
    def log_hyperparams(self, params: Any) -> None:
        if not isinstance(self.experiment, DummyExperiment):  # the dummy has no config to update
            super().log_hyperparams(params)

    @rank_zero_only
    def mark_preempting(self) -> None:
        """Tell an online wandb run that the job is being preempted (requeued), so the dashboard shows it as
        preempted rather than crashed; offline runs have no server to tell."""
        run = self._experiment
        if run is None or isinstance(run, DummyExperiment) or getattr(run, "offline", False):
            return
        with contextlib.suppress(Exception):  # a dashboard call must never end the job
            run.mark_preempting()

    @rank_zero_only
    def finish_before_requeue(self) -> None:
        """End this attempt's wandb session with everything it logged on disk, before the job is requeued.

        The requeue makes SLURM signal every process of the job step (its process tracking follows descendants,
        so wandb-core's own session does not shield it), and wandb-core exits on SIGTERM without writing what it
        has buffered: what an attempt logs after that signal, or only buffered before it, never reaches the
        run. So: finish the run and stop the service now; the requeued attempt resumes the same run id."""
        self.mark_preempting()
        self.finalize("preempted")
        self._experiment = DummyExperiment()  # Lightning's own finalize at teardown finds nothing left to do
        import wandb

        with contextlib.suppress(Exception):  # a dashboard call must never end the job
            wandb.teardown()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        super().finalize(status)
        run = self._experiment
        if run is None or isinstance(run, DummyExperiment) or self._sync_hint_printed:
            return
        self._sync_hint_printed = True
        offline = getattr(run, "offline", run.settings.mode == "offline")
        sync_dir = Path(getattr(run, "sync_dir", run.settings.sync_dir))
        # One deepres command is one wandb session: finish it here, so its files are complete when
        # the hint is printed and a later fit in the same process (tests, notebooks) starts its own.
        try:
            run.finish(exit_code=0 if status == "success" else 1)
        except Exception as err:  # e.g. SLURM's SIGTERM also ended the wandb service: the job must still stop cleanly
            self._lost(err)
        if not offline and getattr(run, "url", None):
            print(f"wandb: run {run.id}: {run.url}", flush=True)
        if offline:
            # A resumed or requeued offline run leaves one directory per session; all belong to this run.
            sessions = sorted(sync_dir.parent.glob(f"offline-run-*-{run.id}")) or [sync_dir]
            print(f"wandb: run {run.id} was logged offline. Upload it with:\n"
                  f"    wandb sync {' '.join(str(s) for s in sessions)}", flush=True)


def _settings(cfg: WandbConfig) -> Any:
    import wandb

    # quiet: wandb's "Suppress non-essential output" (banner, run history and summary); warnings still show.
    return wandb.Settings(quiet=True) if cfg.quiet else None


def make_wandb_logger(cfg: WandbConfig, run_dir: str | Path, run_config: dict[str, Any]) -> WandbLogger | None:
    """Lightning's WandbLogger for this run directory, or None when wandb is off."""
    if not cfg.enabled:
        return None
    mode = resolve_mode(cfg.mode)
    if mode == "disabled":
        return None
    run_dir = Path(run_dir)
    run_id = run_id_for(run_dir)
    if mode == "offline" and not os.environ.get("WANDB_MODE"):
        rank_zero_info(f"wandb: no credentials found (WANDB_API_KEY, ~/.netrc); logging offline to {run_dir / 'wandb'}.")
    return DeepresWandbLogger(
        project=cfg.project,
        entity=cfg.entity,
        group=cfg.group,
        tags=list(cfg.tags) or None,
        name=cfg.name or run_dir.resolve().name,
        save_dir=str(run_dir),  # wandb writes to save_dir/wandb/
        id=run_id,
        resume="allow",
        mode=mode,
        log_model=cfg.log_model,
        settings=_settings(cfg),
        config=run_config,  # with the caller's run_info: git SHA, package versions, command
    )

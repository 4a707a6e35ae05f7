"""``fedrobust tune``: an NSGA-II study (Optuna) whose trials run in parallel on Ray.

``tune.sampler`` picks the sampler: ``nsga2`` (the paper's, the default), or
Optuna's sample-efficient multi-objective ones, ``tpe`` and ``gp``
(:func:`make_sampler`); everything else below holds for each.

The study lives in Optuna storage (SQLite in ``study_dir`` unless
``tune.storage`` names an RDB URL), so running the same command again
resumes it: completed trials are kept; a trial that was running when the
tuner died is marked failed and its parameters are queued again, unless it
had already written its evaluated result, which is then recorded as is.
Trials are asked for and told by this process only (Optuna's ask-and-tell);
Ray only runs them, so one lock file per study directory is enough to keep
two tuners apart.

Objectives, both maximised: RA_T and RA_Q (``tune.objectives=robustness``),
or validation accuracy and min(RA_T, RA_Q) (``accuracy``). The constraint
``CA >= baseline - tune.max_accuracy_drop`` is recorded on each trial with
``Trial.set_constraint`` (Optuna 5's replacement for the deprecated
``constraints_func`` argument; NSGA-II reads the same value), so infeasible
trials are dominated by feasible ones.
The baseline is the centralized deployment's clean accuracy with the
study's base hyperparameters, trained once per study (or
``tune.baseline_accuracy``).

Nothing is selected on the test set. Trials run with
``attack.split=validation``: CA is the ensemble's accuracy on the union of
the nodes' validation splits, RA_T and RA_Q are measured on ``tune.selection``
images drawn from that union (``attack.num_samples`` if null), and no test
image is classified or attacked while the study runs. The baseline's CA is
measured the same way, on its own validation split: the study's validation
images are mostly in the baseline's training split, so scoring it there
would flatter it. When the study ends, the feasible Pareto front is
evaluated once on the test sample (:mod:`.holdout`), and ``trials.csv``,
``pareto.json``, ``recommended.md`` and the plot show both figures.

A trial whose training diverged (its error names a member that
``diverged``) is recorded as failed with that reason and is not re-queued:
divergence is an outcome of its hyperparameters, and the same parameters
would diverge again. It does not count towards ``tune.max_failures``, which
is about broken trials and workers; a study stops only if more trials
diverge than ``tune.n_trials``, since then the space is mostly divergent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
from pathlib import Path
from typing import Any

import optuna
from omegaconf import DictConfig, OmegaConf

from ..atomic import write_json, write_text
from ..errors import ConfigError
from ..interrupt import deferred
from ..progress import progress as progress_bar
from ..redact import redacted, redacted_container
from . import holdout, outputs
from .fidelity import Ladder, rung_dir_name, rung_row
from .space import SHORT_NAMES, SearchSpace
from .trial import apply_values, load_scores, trial_task

__all__ = ["run_study", "open_study", "prepare_zoo", "share_artefacts", "study_lock", "trial_rows", "StudyLocked"]

log = logging.getLogger("fedrobust")

CONSTRAINT_ATTR = "constraint"  # (min accuracy - CA): <= 0 is feasible


class StudyLocked(ConfigError):
    pass


@contextlib.contextmanager
def study_lock(study_dir: Path):
    study_dir.mkdir(parents=True, exist_ok=True)
    f = open(study_dir / ".lock", "w")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise StudyLocked(f"study_dir: {study_dir} is in use by another fedrobust tune") from None
        yield
    finally:
        f.close()  # also releases the lock; the OS releases it if this process is killed


def storage_url(cfg: DictConfig, study_dir: Path) -> str:
    return cfg.tune.storage or f"sqlite:///{(study_dir / 'study.db').resolve()}"


def make_sampler(tune: DictConfig) -> optuna.samplers.BaseSampler:
    """``tune.sampler``, seeded with ``tune.seed``. Each one reads the accuracy constraint a trial records
    (``Trial.set_constraint``): NSGA-II ranks infeasible trials behind feasible ones, TPE puts them in its
    "above" group, the GP sampler models the constraint and weights its acquisition by the chance of
    feasibility. ``tune.population_size`` is NSGA-II's population and the others' random start-up trials;
    TPE counts asked, unfinished trials as the worst (constant liar), so trials asked ahead while others
    run do not repeat them."""
    t = tune
    if t.sampler == "tpe":
        return optuna.samplers.TPESampler(n_startup_trials=t.population_size, multivariate=True, constant_liar=True,
                                          seed=t.seed)
    if t.sampler == "gp":
        return optuna.samplers.GPSampler(n_startup_trials=t.population_size, seed=t.seed)
    return optuna.samplers.NSGAIISampler(population_size=t.population_size, seed=t.seed)


def open_study(cfg: DictConfig, study_dir: Path) -> optuna.Study:
    sampler = make_sampler(cfg.tune)
    return optuna.create_study(
        storage=storage_url(cfg, study_dir), study_name=cfg.tune.study_name, sampler=sampler,
        directions=["maximize", "maximize"], load_if_exists=True,
    )


def _base_cfg_for_trials(cfg: DictConfig) -> DictConfig:
    """The trials' config: scored on validation images (``tune.selection`` of them attacked), never on test ones."""
    base = redacted(cfg)  # a copy; only the tuner talks to the storage, so no trial sees its password
    base.evaluate = True
    base.train.progress = False
    base.run_dir = None
    base.attack.split = "validation"
    if cfg.tune.selection is not None:
        base.attack.num_samples = cfg.tune.selection
    pin_cache_dir(base)
    return base


def pin_cache_dir(cfg: DictConfig) -> None:
    """An explicit ``attack.cache_dir`` made absolute, the same path on every node; "" stays each node's own."""
    if cfg.attack.cache_dir:
        cfg.attack.cache_dir = str(Path(cfg.attack.cache_dir).expanduser().resolve())


def _study_config(cfg: DictConfig) -> dict[str, Any]:
    """What must not change between runs of one study (everything but its size and parallelism)."""
    data = redacted_container(cfg)  # a storage URL's password is never written
    for key in ("n_trials", "max_concurrent", "cpus_per_trial", "gpus_per_trial", "max_failures"):
        data["tune"].pop(key, None)
    for key in ("study_dir", "run_dir", "ray"):
        data.pop(key, None)
    data["train"].pop("progress", None)
    data["attack"].pop("cache_dir", None)
    return data


def _check_same_study(study_dir: Path, cfg: DictConfig, genotypes: dict[str, str] | None = None) -> None:
    path = study_dir / "study_config.json"
    current = _study_config(cfg)
    if genotypes:  # the searched models the space chooses from: an edited genotype file is another study
        current["space_genotypes"] = dict(genotypes)
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved != current:
            diff = sorted(_diff_keys(saved, current))
            raise ConfigError(
                f"study_dir: {study_dir} holds a study with another configuration ({', '.join(diff[:4])} differ); "
                "use another study_dir or the same overrides")
    else:
        write_json(path, current, sort_keys=True)
        write_text(study_dir / "config.yaml", OmegaConf.to_yaml(redacted(cfg)))


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in set(a) | set(b):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def baseline_accuracy(cfg: DictConfig, study_dir: Path) -> float:
    """Clean accuracy of the centralized baseline: one member, plain training, the study's base
    hyperparameters (trained once per study, then read back).

    Measured as the trials' CA is, on validation images (``cfg`` is the trials' config, with
    ``attack.split=validation``): the baseline's own validation split, which it never trained on.
    """
    if cfg.tune.baseline_accuracy is not None:
        return float(cfg.tune.baseline_accuracy)
    path = study_dir / "baseline" / "results.json"
    if path.is_file():
        results = json.loads(path.read_text())
        if results.get("images", {}).get("clean_accuracy", {}).get("split") == "validation":
            return float(results["ensemble"]["clean_accuracy"])
    from ..config import config_from_json
    from ..engines import run_inline
    from ..run import finalize_run, prepare_run_dir

    data = OmegaConf.to_container(cfg, resolve=True)
    data["strategy"] = {"name": "plain"}  # standard training: the reference every strategy is held to
    data["deployment"].update(name="centralized", num_nodes=1)
    data["train"].update(rounds=1, progress=False)
    data["engine"]["name"] = "inline"
    data["evaluate"] = False
    base = config_from_json(json.dumps(data))
    if (study_dir / "baseline").exists():
        import shutil

        shutil.rmtree(study_dir / "baseline")  # an attempt killed before it finished, or one scored on test images
    log.info("training the centralized baseline (the accuracy constraint's reference)")
    run_dir = prepare_run_dir(base, str(study_dir / "baseline"))
    results = finalize_run(base, run_dir, run_inline(base))
    return float(results["ensemble"]["clean_accuracy"])


def trial_rows(study: optuna.Study, param_names: list[str], study_dir: Path | None = None,
               min_acc: float | None = None) -> list[dict[str, Any]]:
    """One row per trial; with ``study_dir``, a front trial's test figures (:mod:`.holdout`) once it has them.

    A multi-fidelity study's trial has a row per rung it reached (``rung``, ``budget_epochs``, ``images``);
    ``partial`` marks a row below the full budget, which never enters the front. ``min_acc`` decides a
    promoted rung's feasibility (rung 0's is the trial's recorded constraint)."""
    rows = []
    trials = study.get_trials(deepcopy=False)
    for t in trials:
        u = t.user_attrs
        duration = u.get("seconds")  # the trial's own train + evaluate time (asked trials may wait in the queue)
        row = {"number": t.number, "rung": u.get("rung"), "budget_epochs": u.get("budget_epochs"),
               "images": u.get("images"), "partial": u.get("partial", False),
               "state": t.state.name, **{p: t.params.get(p) for p in param_names},
               "ca": u.get("ca"), "val_accuracy": u.get("val_accuracy"), "ra_t": u.get("ra_t"), "ra_q": u.get("ra_q"),
               "feasible": (u.get(CONSTRAINT_ATTR, math.inf) <= 0) if t.state.name == "COMPLETE" else None,
               "best_epoch": u.get("best_epoch"), "duration_s": round(duration, 2) if duration is not None else None,
               "requeued_from": u.get("requeued_from"), "node": u.get("node"), "run_dir": u.get("run_dir"),
               "failure": u.get("failure")}
        for key, ci in (u.get("intervals") or {}).items():  # 95% Wilson intervals of the validation figures
            if ci:
                row[f"{key}_low"], row[f"{key}_high"] = ci
        if study_dir is not None and t.state.name == "COMPLETE":
            row |= holdout.test_scores(holdout.trial_dir(study_dir, t.number, u.get("run_dir"))) or {}
        rows.append(row)
    for key, record in sorted(study.user_attrs.items()):  # promoted trials' higher rungs (.fidelity)
        parts = key.split(".")
        if len(parts) != 3 or parts[0] != "rung":
            continue
        number, rung = int(parts[1]), int(parts[2])
        row = rung_row(number, rung, record) | {p: trials[number].params.get(p) for p in param_names}
        row["partial"] = bool(record.get("partial"))
        for key2, ci in row.pop("intervals").items():
            if ci:
                row[f"{key2}_low"], row[f"{key2}_high"] = ci
        if row["state"] == "COMPLETE":
            row["feasible"] = min_acc is None or row["val_accuracy"] >= min_acc
            if study_dir is not None:
                row |= holdout.test_scores(holdout.trial_dir(study_dir, number, row["run_dir"])) or {}
        rows.append(row)
    rows.sort(key=lambda r: (r["number"], r.get("rung") or 0))
    return rows


def _tell_complete(study: optuna.Study, trial: optuna.Trial, scores: dict[str, Any], min_acc: float, objectives: str) -> None:
    """Record a finished trial. Its constraint is on its validation accuracy (the union of the nodes' validation
    splits), as the baseline's is; no test figure exists yet. A multi-fidelity trial's budget comes with its
    scores (``fidelity``)."""
    for key in ("ca", "val_accuracy", "ra_t", "ra_q", "best_epoch", "seconds"):
        trial.set_user_attr(key, scores[key])
    f = scores.get("fidelity")
    partial = bool(f) and f["rung"] < f["rungs"] - 1
    if f:
        trial.set_user_attr("rung", f["rung"])
        trial.set_user_attr("budget_epochs", f["epochs"])
        trial.set_user_attr("images", f["images"])
        trial.set_user_attr("partial", partial)
    trial.set_user_attr("intervals", scores.get("intervals") or {})
    trial.set_user_attr(CONSTRAINT_ATTR, min_acc - scores["val_accuracy"])
    if not partial:  # below the full budget the floor says nothing of the trained ensemble (.fidelity)
        trial.set_constraint("clean_accuracy", min_acc - scores["val_accuracy"])
    study.tell(trial, list(outputs.objective_values(scores, objectives)))


def _requeue_stale(study: optuna.Study, trials_dir: Path, min_acc: float, objectives: str,
                   names: list[str] | None = None) -> int:
    """Running trials left by a dead tuner: record those that finished, queue the others again.

    A trial killed while its parameters were being suggested holds only some
    of ``names``; queued again, the rest would be sampled afresh, so it is
    failed and not queued (it never ran; the study asks a new trial instead).
    """
    n = 0
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        with deferred():  # told and queued again together, before a signal is taken
            run_dir = trials_dir / f"trial_{t.number:04d}"
            handle = optuna.Trial(study, t._trial_id)
            scores = load_scores(run_dir)
            if scores is not None:
                log.info("trial %d had finished before the tuner stopped: recorded", t.number)
                _tell_complete(study, handle, scores, min_acc, objectives)
                continue
            if names is not None and not set(names) <= set(t.params):
                handle.set_user_attr("error", "the tuner stopped while this trial's parameters were suggested")
                study.tell(handle, state=optuna.trial.TrialState.FAIL)
                continue
            study.tell(handle, state=optuna.trial.TrialState.FAIL)
            study.enqueue_trial(t.params, user_attrs={"requeued_from": t.number}, skip_if_exists=False)
            n += 1
    if n:
        log.info("re-queued %d trial(s) that were running when the tuner stopped", n)
    return n


def prepare_zoo(cfg: DictConfig) -> list[str]:
    """Train (or find) the surrogate zoo and its transfer examples once, before trials share them;
    their files, relative to the cache root. A multi-fidelity study's rungs attack samples of their own
    sizes: the transfer examples of each."""
    from ..runs.cache import cache_root
    from ..evaluation.evaluate import prepare_transfer_artefacts

    root = cache_root(cfg.attack.cache_dir).resolve()
    sizes = [cfg.attack.num_samples]
    if cfg.get("tune") is not None and cfg.tune.scheduler == "moasha":
        from .settings import rung_images

        f = cfg.tune.fidelity
        sizes = sorted(set(rung_images(cfg.attack.num_samples, f.rungs, f.reduction_factor, f.min_images)))
    names: list[str] = []
    for n in sizes:
        sized = OmegaConf.merge(cfg, {"attack": {"num_samples": int(n)}})
        names += [str(p.resolve().relative_to(root)) for p in prepare_transfer_artefacts(sized)]
    return list(dict.fromkeys(names))


def share_artefacts(pool, cfg: DictConfig) -> dict[str, Any]:
    """Put the zoo and transfer examples into the object store once, for nodes whose cache lacks them."""
    from ..runs.cache import cache_root
    from .remote import pack_files

    names = prepare_zoo(cfg)
    root = cache_root(cfg.attack.cache_dir)
    files = pack_files(root, names)
    size = sum(a.nbytes for a in files.values())
    ref = pool.put(files)
    del files
    log.info("surrogate zoo and transfer examples (%d file(s), %.1f MB) shared through the object store",
             len(names), size / 1e6)
    return {"names": names, "ref": [ref]}  # the ref in a list: a trial fetches it only if its node needs it


def _front_text(rows: list[dict[str, Any]], objectives: str) -> str:
    """The front's objective values on validation images, and on the test sample once measured."""
    def one(r: dict[str, Any]) -> str:
        val = outputs.objective_values(r, objectives)
        text = f"#{r['number']} ({val[0]:.3f}, {val[1]:.3f}"
        if outputs.has_test(r):
            test = outputs.objective_values(r, objectives, test=True)
            text += f"; test {test[0]:.3f}, {test[1]:.3f}"
        return text + ")"

    front = sorted(outputs.front_rows(rows, objectives), key=lambda r: outputs.objective_values(r, objectives))
    return ", ".join(one(r) for r in front) or "none yet"


def write_outputs(study_dir: Path, cfg: DictConfig, study: optuna.Study, space: SearchSpace, baseline: float,
                  *, final: bool) -> list[dict[str, Any]]:
    """trials.csv and pareto.json; with ``final``, the front evaluated once on the test sample (:mod:`.holdout`),
    recommended.md and the plots."""
    min_acc = baseline - cfg.tune.max_accuracy_drop
    rows = trial_rows(study, space.names, study_dir, min_acc)
    if final:
        holdout.evaluate_front(study_dir, cfg, outputs.front_rows(rows, cfg.tune.objectives))
        rows = trial_rows(study, space.names, study_dir, min_acc)
    measured = outputs.measured_on(study_dir, rows, cfg.tune.objectives)
    outputs.write_trials_csv(study_dir / "trials.csv", rows, space.names)
    front = outputs.write_pareto(study_dir / "pareto.json", rows, space.names, cfg.tune.objectives, baseline, min_acc,
                                 measured)
    if final:
        title = f"{cfg.data.name}, {cfg.deployment.name} (N={cfg.deployment.num_nodes}), {cfg.strategy.name}"
        outputs.write_recommended(study_dir / "recommended.md", front, space.names, title, baseline, min_acc, measured)
        outputs.plot_front(study_dir, rows, cfg.tune.objectives, title, tensorboard=True)
    return rows


def _hparams(study_dir: Path, run_name: str, values: dict[str, Any], scores: dict[str, Any], feasible: bool) -> None:
    from torch.utils.tensorboard import SummaryWriter

    hp = {SHORT_NAMES.get(k, k): v for k, v in values.items()}
    with SummaryWriter(str(study_dir / "tensorboard")) as w:
        w.add_hparams(hp, {"hparam/ca": scores["ca"], "hparam/ra_t": scores["ra_t"], "hparam/ra_q": scores["ra_q"],
                           "hparam/val_accuracy": scores["val_accuracy"], "hparam/feasible": float(feasible)},
                      run_name=run_name)


def run_study(cfg: DictConfig) -> list[dict[str, Any]]:
    """Run (or resume) the study until ``tune.n_trials`` trials have completed; return the trial rows."""
    if not cfg.study_dir:
        raise ConfigError("study_dir: required, e.g. study_dir=studies/digits-dirichlet")
    study_dir = Path(cfg.study_dir).expanduser().resolve()
    space = SearchSpace.from_config(cfg)
    for path in space.names:  # every value of the space must give a valid config
        d = space.distributions[path]
        for v in (getattr(d, "choices", None) or (d.low, d.high)):
            apply_values(cfg, space.config_values({path: v}))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with study_lock(study_dir):
        _check_same_study(study_dir, cfg, space.genotypes)
        base = _base_cfg_for_trials(cfg)
        baseline = baseline_accuracy(base, study_dir)
        min_acc = baseline - cfg.tune.max_accuracy_drop
        log.info("baseline clean accuracy %.4f: trials need >= %.4f", baseline, min_acc)
        study = open_study(cfg, study_dir)
        trials_dir = study_dir / "trials"
        trials_dir.mkdir(exist_ok=True)
        _requeue_stale(study, trials_dir, min_acc, cfg.tune.objectives, space.names)
        return _loop(cfg, base, study, space, study_dir, trials_dir, baseline, min_acc)


def _cost(base: DictConfig, values: dict[str, Any]) -> float:
    """Relative cost of a trial: optimiser steps, epochs / batch size."""
    epochs = values.get("train.epochs", base.train.epochs)
    return float(epochs) / float(values.get("train.batch_size", base.train.batch_size))


def _count(study: optuna.Study, state: optuna.trial.TrialState) -> int:
    return len(study.get_trials(deepcopy=False, states=(state,)))


class _StudyTrials:
    """The study as the runner's source (:class:`.runner.TrialSource`): Optuna's ask and tell.

    It asks up to one window ahead (twice the trials that run at once, plus every enqueued trial, whose
    parameters are fixed already), then launches the costliest asked trial into each free slot (longest
    first shortens the tail where few trials are left; NSGA-II assigns generations from completed trials
    only, so asking a little ahead does not change its populations).

    With ``tune.scheduler=moasha`` (:mod:`.fidelity`) a free slot goes first to a promotion that is due;
    new trials start at the lowest budget, and ``tune.n_trials`` counts them.
    """

    def __init__(self, cfg, base, study, space, study_dir, trials_dir, baseline, min_acc, bar) -> None:
        self.cfg, self.base, self.study, self.space = cfg, base, study, space
        self.study_dir, self.trials_dir, self.baseline, self.min_acc, self.bar = (
            study_dir, trials_dir, baseline, min_acc, bar)
        self.cfg_yaml = OmegaConf.to_yaml(base)
        self.complete = _count(study, optuna.trial.TrialState.COMPLETE)
        self.pending: list[tuple[optuna.Trial, dict[str, Any]]] = []  # asked, not launched yet
        self.handles: dict[int, tuple[optuna.Trial, dict[str, Any]]] = {}
        self.lost: dict[int, dict[str, Any]] = {}  # a lost trial's parameters, until it is queued again
        self.runner = None  # set by run_study, for the progress bar's counts
        self.ladder = Ladder(base, study, min_acc) if cfg.tune.scheduler == "moasha" else None
        self.promoted = 0

    def finished(self) -> bool:
        return self.complete >= self.cfg.tune.n_trials and (self.ladder is None or not self.ladder.due())

    def next(self, running: int):
        from .runner import Launch

        if self.ladder is not None:
            launch = self._promotion()
            if launch is not None:
                return launch
            running = sum(isinstance(k, int) for k in self.handles)  # new trials only, not promotions
        t = self.cfg.tune
        # enqueued trials (a user's, or lost ones queued again) are fixed already: asking them early costs the
        # sampler nothing, and lets the longest of them start first
        window = 2 * t.max_concurrent + _count(self.study, optuna.trial.TrialState.WAITING)
        while len(self.pending) + running < window and self.complete + running + len(self.pending) < t.n_trials:
            trial = self.study.ask()
            values = self.space.suggest(trial)
            trial.set_user_attr("run_dir", str(self.trials_dir / f"trial_{trial.number:04d}"))
            self.pending.append((trial, values))
        if not self.pending:
            return None
        trial, values = max(self.pending, key=lambda p: _cost(self.base, p[1]))
        self.pending.remove((trial, values))
        self.handles[trial.number] = (trial, values)
        name = f"trial_{trial.number:04d}"
        log.info("trial %d queued: %s", trial.number,
                 ", ".join(f"{SHORT_NAMES.get(k, k)}={outputs._value(v)}" for k, v in values.items()))
        return Launch(trial.number, name, self.trials_dir / name, self.space.config_values(values), self.cfg_yaml,
                      f"trial {trial.number}", fidelity=self.ladder.budget(0) if self.ladder is not None else None)

    def _promotion(self):
        """The first promotion due (:mod:`.fidelity`), as a launch that resumes the trial's last checkpoint;
        one that had ended before the tuner stopped is recorded instead."""
        import shutil

        from ..resume import CHECKPOINT
        from .runner import Launch

        ladder = self.ladder
        for number, rung in ladder.due():
            name = rung_dir_name(number, rung)
            dest = self.trials_dir / name
            record = {"epochs": ladder.epochs[rung], "images": ladder.images[rung], "run_dir": str(dest),
                      "partial": rung < ladder.top}
            scores = load_scores(dest)
            if scores is not None:
                log.info("trial %d at rung %d had finished before the tuner stopped: recorded", number, rung)
                ladder.record(number, rung, record | {"scores": scores})
                return self._promotion()
            checkpoint = self.trials_dir / rung_dir_name(number, rung - 1) / CHECKPOINT
            if not checkpoint.is_file():
                log.warning("trial %d: no checkpoint at %s to resume; not promoted", number, checkpoint)
                ladder.record(number, rung, record | {"failure": "error", "error": f"no checkpoint at {checkpoint}"})
                return self._promotion()
            if dest.exists():
                shutil.rmtree(dest)  # a copy the tuner stopped while writing
            frozen = self.study.get_trials(deepcopy=False)[number]
            values = {p: frozen.params[p] for p in self.space.names}
            key = f"{number}.r{rung}"
            ladder.running.add((number, rung))
            self.handles[key] = (None, values)
            log.info("trial %d promoted to rung %d (%d epochs, %d images): resumes from epoch %d", number, rung,
                     ladder.epochs[rung], ladder.images[rung], ladder.epochs[rung - 1])
            return Launch(key, name, dest, self.space.config_values(values), self.cfg_yaml,
                          f"trial {number} (rung {rung})", fidelity=ladder.budget(rung), resume=checkpoint,
                          promotion=(number, rung))
        return None

    def _rung_ended(self, launch, record: dict[str, Any]) -> None:
        number, rung = launch.promotion
        self.handles.pop(launch.key)
        self.ladder.running.discard((number, rung))
        if record:
            b = self.ladder.budget(rung)
            self.ladder.record(number, rung, {"epochs": b["epochs"], "images": b["images"], "run_dir": str(launch.dest),
                                              "partial": rung < self.ladder.top} | record)

    def started(self, launch, where: dict[str, Any]) -> None:
        from .pool import short_node

        node = short_node(where)
        trial = self.handles[launch.key][0]
        if trial is not None:  # a promotion's node is recorded with its scores
            trial.set_user_attr("node", node)
        log.info("%s running on %s (%s)", launch.label, node, where.get("host", ""))

    def completed(self, launch, scores: dict[str, Any], where: dict[str, Any]) -> None:
        from .pool import short_node

        t = self.cfg.tune
        if launch.promotion is not None:  # a promoted trial, at a higher rung
            number, rung = launch.promotion
            values = self.handles[launch.key][1]
            self._rung_ended(launch, {"scores": scores, "node": short_node(where)})
            self.promoted += 1
            feasible = scores["val_accuracy"] >= self.min_acc
            _hparams(self.study_dir, launch.name, values, scores, feasible)
            rows = write_outputs(self.study_dir, self.cfg, self.study, self.space, self.baseline, final=False)
            log.info("trial %d done at rung %d (%d epochs) on %s: CA %.4f%s, RA_T %.4f, RA_Q %.4f | front: %s",
                     number, rung, self.ladder.epochs[rung], short_node(where), scores["ca"],
                     "" if feasible else " (infeasible)", scores["ra_t"], scores["ra_q"], _front_text(rows, t.objectives))
            return
        trial, values = self.handles.pop(launch.key)
        _tell_complete(self.study, trial, scores, self.min_acc, t.objectives)
        self.complete += 1
        feasible = scores["val_accuracy"] >= self.min_acc
        _hparams(self.study_dir, launch.name, values, scores, feasible)
        rows = write_outputs(self.study_dir, self.cfg, self.study, self.space, self.baseline, final=False)
        log.info("trial %d done on %s (validation images): CA %.4f%s, RA_T %.4f, RA_Q %.4f | front: %s", launch.key,
                 short_node(where), scores["ca"], "" if feasible else " (infeasible)", scores["ra_t"],
                 scores["ra_q"], _front_text(rows, t.objectives))
        c = self.runner.counts if self.runner is not None else {}
        promoted = f"promoted {self.promoted}, " if self.ladder is not None else ""
        self.bar.set_postfix_str(f"running {self.runner.running if self.runner else 0}, queued {len(self.pending)}, "
                                 f"{promoted}"
                                 f"failed {c.get('error', 0)}, diverged {c.get('diverged', 0)}, lost {c.get('lost', 0)}, "
                                 f"front {len(outputs.front_rows(rows, t.objectives))}", refresh=False)
        self.bar.update(1)

    def failed(self, launch, reason: str, kind: str, where: dict[str, Any]) -> None:
        if launch.promotion is not None:  # lost: due again (no record); diverged or failed: recorded, not again
            from .pool import short_node

            self._rung_ended(launch, {} if kind == "lost" else {"failure": kind, "error": reason,
                                                               "node": short_node(where)})
            return
        trial, _ = self.handles.pop(launch.key)
        if kind == "lost":
            self.lost[launch.key] = trial.params
        trial.set_user_attr("error", reason)
        trial.set_user_attr("failure", kind)  # lost, diverged or error
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        diverged = self.runner.counts["diverged"] if self.runner is not None else 0
        if diverged > self.cfg.tune.n_trials:
            raise RuntimeError(f"{diverged} trials diverged, more than tune.n_trials={self.cfg.tune.n_trials}: "
                               "narrow the search space (e.g. a lower optimizer.lr high)")

    def retry(self, launch) -> None:
        """A lost trial's parameters, queued again: the next ask runs them (a lost promotion is due again)."""
        if launch.promotion is not None:
            return
        self.study.enqueue_trial(self.lost.pop(launch.key), user_attrs={"requeued_from": launch.key},
                                 skip_if_exists=False)

    def cancelled(self, launch) -> None:
        """A trial stopped as the tuner stops: failed now (kind ``cancelled``), its parameters queued again
        (a cancelled promotion is not recorded: it is due again when the study resumes)."""
        if launch.promotion is not None:
            self._rung_ended(launch, {})
            return
        trial, _ = self.handles.pop(launch.key)
        self._cancel(trial)

    def cancel_pending(self) -> None:
        """The trials asked but not launched yet, as :meth:`cancelled` (the tuner is stopping)."""
        while self.pending:
            self._cancel(self.pending.pop()[0])

    def _cancel(self, trial: optuna.Trial) -> None:
        trial.set_user_attr("failure", "cancelled")
        trial.set_user_attr("error", "cancelled: the tuner stopped before it ended")
        self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
        self.study.enqueue_trial(trial.params, user_attrs={"requeued_from": trial.number}, skip_if_exists=False)


def _loop(cfg, base, study, space, study_dir, trials_dir, baseline, min_acc) -> list[dict[str, Any]]:
    from .pool import EventLog, TrialPool
    from .runner import TrialRunner

    t = cfg.tune
    complete = _count(study, optuna.trial.TrialState.COMPLETE)
    bar = progress_bar(total=t.n_trials, initial=min(complete, t.n_trials), desc="trials", enabled=cfg.train.progress)
    source = _StudyTrials(cfg, base, study, space, study_dir, trials_dir, baseline, min_acc, bar)
    try:
        if not source.finished():
            pool = None
            try:
                with deferred():  # the pool is held (and closed below) before a signal is taken
                    pool = TrialPool(trial_task, address=cfg.ray.address, cpus=t.cpus_per_trial, gpus=t.gpus_per_trial,
                                     max_concurrent=t.max_concurrent)
                pool.start()  # Ray: a signal meanwhile is taken at once
                artefacts = share_artefacts(pool, base)
                runner = TrialRunner(pool, source, EventLog(study_dir / "executions.jsonl"), max_failures=t.max_failures,
                                     failures_key="tune.max_failures", threads=max(1, int(t.cpus_per_trial)),
                                     artefacts=artefacts)
                source.runner = runner
                runner.run()  # it closes the pool however it ends, and marks what it cancelled
            finally:
                if pool is not None:
                    pool.close()  # a no-op once closed
    except BaseException:
        # stopping (a signal, an error): what was asked but never ran is cancelled too, and trials.csv
        # says so now, not at the next run
        source.cancel_pending()
        with contextlib.suppress(Exception):
            write_outputs(study_dir, cfg, study, space, baseline, final=False)
        raise
    finally:
        bar.close()
    rows = write_outputs(study_dir, cfg, study, space, baseline, final=True)
    log.info("study done: %d completed trial(s); Pareto front: %s", source.complete, _front_text(rows, t.objectives))
    log.info("outputs: %s", ", ".join(str(study_dir / n) for n in
                                       ("trials.csv", "pareto.json", "recommended.md", "pareto.png", "tensorboard")))
    return rows

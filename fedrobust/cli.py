"""``fedrobust`` command line.

``fedrobust train [hydra overrides]`` trains an ensemble and writes a run
directory. Configuration errors exit with code 2 and a one-line message,
before anything is created on disk.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable

# Nothing heavy at module level: main() installs the signal handlers before it imports the config,
# torch, Flower or Ray, so that a signal from the first moment ends the command in one line.
from .errors import ConfigError, one_line
from .interrupt import Interrupted, as_interrupt, deferred, guarded

__all__ = ["main"]

log = logging.getLogger("fedrobust")

_TRAIN_HELP = """\
Hydra overrides, e.g.:
  fedrobust train data=digits model=cnn deployment=distributed_dirichlet deployment.num_nodes=5
  fedrobust train engine=inline optimizer.lr=0.01 train.epochs=50 train.seed=3 run_dir=runs/lr001

groups:   data={digits,fashion_mnist,mnist,cifar10,cifar100}
          model={cnn,resnet18,resnet34,mobilenetv2,vgg16,resnet8,vgg7,mlp,lenet,convnet,searched:PATH}
          deployment={centralized,deep_ensemble,distributed_iid,distributed_dirichlet}
          strategy={plain,curvature,dispersion,edlcm,adversarial}  engine={simulation,inline}
keys:     optimizer.{lr,momentum,weight_decay}  train.{epochs,rounds,batch_size,patience,seed,device,precision,progress}
          deployment.{num_nodes,alpha,partition_seed}  data.{root,train_subset,augment,crop_padding,val_fraction}
          engine.{num_cpus,num_gpus,timeout,on_missing,min_members,ray_address}  evaluate=true  attack.*  run_dir=PATH
"""


_EVAL_HELP = """\
Overrides (key=value) apply to the run's saved config, e.g.:
  fedrobust evaluate runs/demo attack.eps=0.0627 attack.queries=1000
  fedrobust evaluate runs/demo attack.surrogates=[cnn,vgg16] attack.whitebox_loss=dlr
keys: attack.{eps,eps_l2,num_samples,sample_seed,split,surrogates,surrogate_epochs,transfer,transfer_attacks,
      transfer_steps,transfer_loss,query,query_attacks,queries,p_init,square_loss,whitebox,whitebox_loss,
      nonfinite,whitebox_steps,apgd_steps,apgd_targets,restarts,per_member,tsr,tsr_steps,hessian_samples,power_iters,seed,cache_dir}
"""


def _error(exc: BaseException) -> None:
    print(f"fedrobust: error: {one_line(exc)}", file=sys.stderr)


def _interrupted(intr: Interrupted, kept: str) -> int:
    log.warning("interrupted by %s; %s", intr.name, kept)
    print(f"fedrobust: interrupted ({intr.name}); {kept}", file=sys.stderr)
    return intr.exit_code


def _train(overrides: list[str]) -> int:
    try:
        from .config import load_config

        cfg = load_config(overrides)  # before anything is written: a bad override is answered at once
        _check_all(cfg)
        from .run import INCOMPLETE, check_run_dir, preflight, prepare_run_dir

        check_run_dir(cfg.run_dir)
        preflight(cfg)
    except ConfigError as exc:
        _error(exc)
        return 2
    t0 = time.perf_counter()
    run_dir = None

    def train() -> None:
        nonlocal run_dir
        with deferred():  # the run directory is whole (its config, marked INCOMPLETE) before a signal is taken
            run_dir = prepare_run_dir(cfg, cfg.run_dir)
        if cfg.engine.name == "inline":
            from .engines import run_inline
            from .run import finalize_run

            missing: dict = {}
            finalize_run(cfg, run_dir, run_inline(cfg, missing), missing=missing or None)
        else:
            from .engines import run_simulation

            run_simulation(cfg, run_dir)

    def kept() -> str:
        if run_dir is None:
            return "nothing was written"
        if (run_dir / INCOMPLETE).is_file():
            return f"training stopped; {run_dir} is marked {INCOMPLETE}: evaluate and train refuse it"
        return f"training had finished; results in {run_dir}"  # the signal came as the simulation shut down

    code = _guarded_step(train, "training", kept)
    if code is not None:
        return code
    log.info("done in %.1fs; results in %s", time.perf_counter() - t0, run_dir / "results.json")
    if cfg.evaluate:
        return _run_evaluation(run_dir, cfg, train_seconds=time.perf_counter() - t0)
    return 0


def _guarded_step(fn: Callable[[], object], what: str, kept: Callable[[], str]) -> int | None:
    """Run a command's main work: None when it succeeds, else the exit code, after one line on stderr
    (2 for bad input, 1 for a failure, 128 + signum for an interruption, saying what was kept)."""
    try:
        fn()
    except ConfigError as exc:
        _error(exc)
        return 2
    except BaseException as exc:
        intr = as_interrupt(exc)
        if intr is not None:
            return _interrupted(intr, kept())
        if not isinstance(exc, Exception):
            raise
        log.error("%s failed: %s", what, one_line(exc))
        _error(exc)
        return 1
    return None


def _run_evaluation(run_dir, cfg, train_seconds: float | None = None) -> int:
    from .evaluation.evaluate import PARTIAL, evaluate_run

    def kept() -> str:
        if (run_dir / PARTIAL).is_file():
            return (f"results.json unchanged; finished stages kept in {run_dir / PARTIAL}: "
                    f"run fedrobust evaluate {run_dir} to resume")
        return "results.json unchanged"

    t0 = time.perf_counter()
    code = _guarded_step(lambda: evaluate_run(run_dir, cfg), "evaluation", kept)
    if code is not None:
        return code
    seconds = time.perf_counter() - t0
    log.info("evaluated in %.1fs; results in %s", seconds, run_dir / "results.json")
    if train_seconds is not None:
        log.info("time: training %.1fs + evaluation %.1fs = %.1fs", train_seconds, seconds, train_seconds + seconds)
    return 0


def _check_all(cfg) -> None:
    """The attack section's checks, which need the stage and loss registries (so torch): run after the
    config's own sections were checked without them, so that a bad key or value there is answered at once."""
    from .validation import validate_all

    validate_all(cfg)


def _load_run(path, overrides: list[str]):
    """A completed run's saved config with ``overrides`` applied, every member checkpoint checked;
    ConfigError (one line) for anything else."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import structured_base
    from .run import preflight
    from .validation import apply_overrides  # every section checked
    from .runs.members import check_complete, load_ensemble

    if not path.is_dir():
        raise ConfigError(f"run_dir: {path} is not a directory (expected a run directory written by fedrobust train)")
    if not (path / "config.yaml").is_file() or not any((path / "members").glob("member_*.pt")):
        raise ConfigError(f"run_dir: {path} is not a run directory (expected config.yaml and members/member_*.pt)")
    check_complete(path)
    try:
        saved = OmegaConf.load(path / "config.yaml")
        if saved.get("attack", {}).get("surrogates") == []:  # written before null meant the default zoo
            saved.attack.surrogates = None
        cfg = OmegaConf.merge(structured_base(saved.get("strategy", {}).get("name", "plain")), saved)
    except (OmegaConfBaseException, ValueError, AttributeError) as exc:
        raise ConfigError(f"run_dir: {path / 'config.yaml'} is not a valid run config ({one_line(exc)})") from None
    cfg = apply_overrides(cfg, overrides)
    preflight(cfg)
    load_ensemble(path, "cpu", cfg)  # every checkpoint is checked before anything is written
    return cfg


def _evaluate(run_dir: str, overrides: list[str]) -> int:
    from pathlib import Path

    from .evaluation.evaluate import read_results
    from .run import setup_logging

    path = Path(run_dir)
    try:
        cfg = _load_run(path, overrides)
        read_results(path)
    except ConfigError as exc:
        _error(exc)
        return 2
    setup_logging(path, "evaluate.log")
    return _run_evaluation(path, cfg)


_SEARCH_HELP = """\
AutoLoss-AR (paper 004): genetic programming over loss expressions, fitness = robust accuracy after PGD-10
on validation images; the found losses are then measured on held-out test images. E.g.:
  fedrobust search-loss runs/demo loss_search=small loss_search.eps=0.1
  fedrobust search-loss runs/demo loss_search.generations=100 loss_search.population=200   # Table IV's defaults
  fedrobust evaluate runs/demo attack.whitebox_loss=file:runs/demo/loss_search/best.json
Running the same command again resumes the search from its last finished generation.
keys: loss_search.{generations,population,tournament,selections,crossover,mutation,max_depth,init_min_depth,
      init_max_depth,mutation_depth,hand_made_start,seed,eps,steps,attack_seed,num_images,sample_seed,target,hall_of_fame,test,
      test_images,long_steps,apgd_steps,test_eps,ray_address,out_dir}   presets: loss_search={paper,small}
"""


def _search_loss(run_dir: str, overrides: list[str]) -> int:
    from pathlib import Path

    try:
        from .lossearch.settings import load_settings

        path = Path(run_dir)
        cfg = _load_run(path, [])
        from .runs.members import member_files

        settings = load_settings(overrides, len(member_files(path)))
        from .lossearch.search import run_search, search_dir
        from .run import setup_logging
    except ConfigError as exc:
        _error(exc)
        return 2
    out = search_dir(path, settings)
    setup_logging()
    code = _guarded_step(lambda: run_search(path, cfg, settings, log_file=True), "loss search",
                         lambda: f"finished generations are kept in {out}; run the same command to resume")
    return 0 if code is None else code


_ARCH_HELP = """\
AdvRush (paper 003): a DARTS supernet searched on the training images, with the input-smoothness penalty
after a warm-up (arch_search.gamma=0: plain DARTS). E.g.:
  fedrobust search-arch searches/fmnist data=fashion_mnist arch_search=small
  fedrobust search-arch searches/darts data=fashion_mnist arch_search=small arch_search.gamma=0
  fedrobust train data=fashion_mnist model=searched:searches/fmnist/genotype.json
Running the same command again resumes the search from its last finished epoch.
keys: arch_search.{epochs,warmup,gamma,h,batch_size,w_lr,w_lr_min,w_momentum,w_weight_decay,grad_clip,alpha_lr,
      alpha_betas,alpha_weight_decay,layers,channels,steps,stem_multiplier,stem_stride,net_layers,net_channels,images,
      split_seed,seed,probe_images,power_iters,device,progress}   presets: arch_search={paper,small}
      data=NAME data.{root,train_subset}
"""


def _search_arch(out_dir: str, overrides: list[str]) -> int:
    from pathlib import Path

    try:
        data_overrides = [o for o in overrides if o.split("=", 1)[0] == "data" or o.startswith("data.")]
        rest = [o for o in overrides if o not in data_overrides]
        for item in rest:
            key, sep, _ = item.partition("=")
            if not sep or not (key == "arch_search" or (key.startswith("arch_search.") and len(key) > 12)):
                raise ConfigError(f"{item}: search-arch takes data=NAME, data.KEY=VALUE, arch_search=PRESET "
                                  "and arch_search.KEY=VALUE")
        from .validation import load_config

        cfg = load_config(data_overrides)
        from .nas.settings import load_settings

        settings = load_settings(rest)
        from .data import DataError, dataset_of

        try:
            data = dataset_of(cfg)
        except DataError as exc:
            raise ConfigError(f"data: {one_line(exc)}") from None
        from .nas.search import run_search
        from .run import setup_logging
    except ConfigError as exc:
        _error(exc)
        return 2
    out = Path(out_dir)
    setup_logging()
    code = _guarded_step(lambda: run_search(out, data, settings, log_file=True), "architecture search",
                         lambda: f"finished epochs are kept in {out}; run the same command to resume")
    return 0 if code is None else code


_MODELS_HELP = """\
Parameter counts of the hand-made models at a data set's image shape, and of searched genotypes, e.g.:
  fedrobust models data=fashion_mnist searches/fmnist/genotype.json searched:searches/darts/genotype.json
(a genotype is its file's path, with or without searched:)
"""


def _models(args: list[str]) -> int:
    from .data_settings import DATASETS
    from .models.settings import MODELS, is_searched

    data, names = "digits", list(MODELS)
    for arg in args:
        if arg.startswith("data="):
            data = arg[len("data="):]
            if data not in DATASETS:
                _error(ConfigError(f"data: unknown dataset '{data}' (choose from {', '.join(DATASETS)})"))
                return 2
        elif arg.partition("=")[1] and not is_searched(arg):
            _error(ConfigError(f"{arg}: models takes data=NAME and genotype files (searched:PATH)"))
            return 2
        else:
            names.append(arg if is_searched(arg) else f"searched:{arg}")
    from .models import DATA_SHAPES, count_parameters
    from .nas import GenotypeError

    rows = []
    for name in names:
        try:
            rows.append((name, count_parameters(name, data)))
        except GenotypeError as exc:
            _error(exc)
            return 2
    c, h, w, k = DATA_SHAPES[data]
    width = max(len(n) for n, _ in rows)
    print(f"{data}: {c}x{h}x{w} images, {k} classes")
    print(f"{'model':<{width}}  {'parameters':>12}")
    print("\n".join(f"{n:<{width}}  {p:>12,}" for n, p in rows))
    return 0


_TUNE_HELP = """\
Hydra overrides plus study_dir=PATH, e.g.:
  fedrobust tune study_dir=studies/dirichlet tune.n_trials=12 tune.population_size=4 tune.max_concurrent=2
  fedrobust tune study_dir=studies/edlcm strategy=edlcm '+tune.space.strategy.alpha={type:float,low:0.1,high:10,log:true}'
  fedrobust tune study_dir=studies/cluster ray.address=auto tune.cpus_per_trial=4 tune.gpus_per_trial=1
Running the same command again resumes the study. Trials train inline (engine=inline) unless the
command names an engine, e.g. engine=simulation.
Multi-fidelity (MO-ASHA): tune.scheduler=moasha trains each trial to a low budget first and promotes the best
1 in tune.fidelity.reduction_factor to the next rung, resuming its checkpoint.
keys: tune.{n_trials,sampler,scheduler,population_size,max_concurrent,seed,objectives,max_accuracy_drop,
      baseline_accuracy,storage,study_name,cpus_per_trial,gpus_per_trial,max_failures,selection,space}
      tune.fidelity.{rungs,reduction_factor,min_epochs,min_images}  ray.address  study_dir
"""


def _names_engine(override: str) -> bool:
    return override.split("=", 1)[0].lstrip("+~") in ("engine", "engine.name")


def _tune(overrides: list[str]) -> int:
    try:
        # Trials train inline unless the command names an engine: the same members bit for bit as the
        # simulation engine, without starting a private Ray instance per trial.
        if not any(_names_engine(o) for o in overrides):
            overrides = ["engine=inline", *overrides]
        from .config import load_config

        cfg = load_config(overrides)  # before anything is written
        _check_all(cfg)
        if not cfg.study_dir:
            raise ConfigError("study_dir: required, e.g. fedrobust tune study_dir=studies/demo")
        from .run import check_output_dir, preflight, setup_logging
        from .tuning.study import run_study

        check_output_dir(cfg.study_dir, "study_dir")
        preflight(cfg)
    except ConfigError as exc:
        _error(exc)
        return 2
    setup_logging()
    code = _guarded_step(lambda: run_study(cfg), "tuning",
                         lambda: f"the study in {cfg.study_dir} is kept (completed trials in study.db and trials.csv); "
                                 "run the same command to resume")
    return 0 if code is None else code


def _report(path: str) -> int:
    from pathlib import Path

    from .run import setup_logging
    from .tuning.report import report

    setup_logging()
    try:
        if (Path(path) / "results.json").is_file():  # a run directory
            from .evaluation.summary import run_report

            print(run_report(Path(path)), end="")
            return 0
        out = report(Path(path))
    except ConfigError as exc:
        _error(exc)
        return 2
    except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:  # a damaged study or sweep file
        _error(ConfigError(f"path: {path} holds a damaged or partial study file ({type(exc).__name__}: {exc})"))
        return 2
    print(out)
    return 0


def _compare(run_a: str, run_b: str, out: str) -> int:
    from pathlib import Path

    from .evaluation.summary import compare_runs
    from .run import setup_logging

    setup_logging()
    try:
        text, _ = compare_runs(Path(run_a), Path(run_b), Path(out))
    except ConfigError as exc:
        _error(exc)
        return 2
    print(text, end="")
    print(f"(written to {out})", file=sys.stderr)
    return 0


_DEPLOY_HELP = """\
A real deployment (see the docs' Deployment page, docs/deployment.md):
  fedrobust deploy certs deploy/certs --host superlink.example.org
  fedrobust deploy keys deploy/keys node0 node1 node2
  fedrobust deploy connection fedrobust --address superlink.example.org:8000 --ca deploy/certs/ca.crt
  flwr supernode register deploy/keys/node0.pub fedrobust          # once per SuperNode
  fedrobust deploy superlink --certs deploy/certs --bind 0.0.0.0
  CUDA_VISIBLE_DEVICES=0 fedrobust deploy supernode --superlink superlink.example.org:8000 \\
      --ca deploy/certs/ca.crt --key deploy/keys/node0 --partition-id 0 --num-partitions 3
  fedrobust deploy run fedrobust deployment.num_nodes=3 run_dir=/abs/runs/r1   # exit 0 only if the run completed
"""


def _deploy(args: argparse.Namespace) -> int:
    import os

    from . import deploy

    try:
        if args.what == "certs":
            paths = deploy.make_certificates(args.out_dir, args.host)
            print("\n".join(str(p) for p in paths.values()))
        elif args.what == "keys":
            for priv, pub in deploy.make_supernode_keys(args.out_dir, args.names).values():
                print(f"{priv}  (private: stays on the SuperNode's machine)\n{pub}  (register it: flwr supernode register {pub} <connection>)")
        elif args.what == "connection":
            print(deploy.write_connection(args.name, args.address, args.ca, insecure=args.insecure))
        elif args.what == "superlink":
            argv = deploy.superlink_argv(args.certs, port=args.port, bind=args.bind, database=args.database,
                                         log_file=args.log_file, insecure=args.insecure)
            sys.stdout.flush()
            os.execvp(argv[0], argv)  # an argument list, never a shell string
        elif args.what == "supernode":
            argv = deploy.supernode_argv(args.superlink, args.partition_id, args.num_partitions, ca=args.ca, key=args.key,
                                         data_root=args.data_root, port=args.port, insecure=args.insecure)
            os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
            sys.stdout.flush()
            os.execvp(argv[0], argv)
        elif args.what == "run":
            return _deploy_run(args)
    except ConfigError as exc:
        _error(exc)
        return 2
    return 0


def _deploy_run(args: argparse.Namespace) -> int:
    """Submit with ``flwr run``, stream the log, exit with the run's final status (``flwr run`` exits 0 regardless)."""
    from . import deploy

    try:
        from .overrides import inline_model_overrides
        from .config import load_config

        cfg = load_config(args.overrides)  # a bad override is answered here, before anything is submitted
        _check_all(cfg)

        # a searched model's genotype travels as JSON: the ServerApp's machine need not have its file
        run_id = deploy.submit_run(args.connection, inline_model_overrides(args.overrides, cfg), cfg.run_dir, args.app)
    except deploy.RunFailed as exc:
        _error(exc)
        return 1
    print(f"run {run_id} submitted to {args.connection}; its log follows (Ctrl-C stops following, not the run)",
          flush=True)
    go_on = f"`flwr log {run_id} {args.connection}` follows it, `flwr stop {run_id} {args.connection}` stops it"
    try:
        deploy.follow_run(args.connection, run_id)
    except deploy.RunFailed as exc:
        _error(exc)
        return 1
    except BaseException as exc:
        intr = as_interrupt(exc)
        if intr is None:
            raise
        print(f"fedrobust: interrupted ({intr.name}); run {run_id} goes on at the SuperLink: {go_on}", file=sys.stderr)
        return intr.exit_code  # one line: no log warning, which without a log file would print a second one
    print(f"run {run_id} finished:completed", flush=True)
    return 0


def main(argv: list[str] | None = None, *, process: bool = False) -> int:
    """The command line: ``fedrobust COMMAND ...``; the exit code.

    The SIGINT and SIGTERM handlers come first, before any import that takes time: a signal at any
    moment ends the command in one line (see :mod:`fedrobust.interrupt`). ``process``: this is the
    command's own process, which exits with the code (:func:`entry`).
    """
    # each command says what it kept when interrupted in its main work; before that, nothing was written
    return guarded(lambda: _main(argv), "nothing was written", then_ignore=process)


def entry() -> None:
    """The ``fedrobust`` console script: run the command, exit with its code."""
    sys.exit(main(process=True))


def _main(argv: list[str] | None) -> int:
    parser = argparse.ArgumentParser(prog="fedrobust", description="Robust federated ensembles.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train", help="train an ensemble and write a run directory",
        epilog=_TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("overrides", nargs="*", help="Hydra overrides (key=value, group=option)")
    evaluate = sub.add_parser(
        "evaluate", help="attack a trained run's ensemble and add the metrics to its results.json",
        epilog=_EVAL_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("run_dir", help="a run directory written by fedrobust train")
    evaluate.add_argument("overrides", nargs="*", help="overrides, e.g. attack.eps=0.1 attack.queries=1000")
    tune = sub.add_parser(
        "tune", help="NSGA-II hyperparameter study on Ray (resumable)",
        epilog=_TUNE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    tune.add_argument("overrides", nargs="*", help="Hydra overrides and study_dir=PATH")
    sl_ = sub.add_parser(
        "search-loss", help="search the attack loss that breaks a run's ensemble best (AutoLoss-AR, resumable)",
        epilog=_SEARCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sl_.add_argument("run_dir", help="a run directory written by fedrobust train")
    sl_.add_argument("overrides", nargs="*", help="loss_search=PRESET and loss_search.KEY=VALUE")
    sa_ = sub.add_parser(
        "search-arch", help="search a member architecture with a smooth input loss landscape (AdvRush, resumable)",
        epilog=_ARCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sa_.add_argument("out_dir", help="the search's folder (created; a rerun resumes it)")
    sa_.add_argument("overrides", nargs="*", help="data=NAME, data.KEY=VALUE, arch_search=PRESET, arch_search.KEY=VALUE")
    mo_ = sub.add_parser("models", help="parameter counts of the hand-made models and of searched genotypes",
                         epilog=_MODELS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    mo_.add_argument("args", nargs="*", metavar="data=NAME | searched:PATH",
                     help="the data set (default digits) and genotype files")
    rep = sub.add_parser("report", help="a Markdown summary (and plots) of a run, a study or a sweep directory")
    rep.add_argument("path", help="a run directory, a study_dir written by fedrobust tune, or a sweep directory "
                     "from simulations/")
    cmp_ = sub.add_parser("compare", help="two runs evaluated on the same images: per attack, the difference, its "
                          "paired 95%% interval and McNemar's exact p-value")
    cmp_.add_argument("run_a", help="run directory A (evaluated)")
    cmp_.add_argument("run_b", help="run directory B (evaluated on the same images)")
    cmp_.add_argument("--out", default="compare.md", help="the Markdown table's file (default: compare.md)")
    dep = sub.add_parser("deploy", help="credentials and launchers for a real deployment (TLS, SuperNode auth)",
                         epilog=_DEPLOY_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = dep.add_subparsers(dest="what", required=True)
    c = dsub.add_parser("certs", help="a CA and the SuperLink's TLS certificate")
    c.add_argument("out_dir")
    c.add_argument("--host", action="append", default=[], help="a name or IP the SuperLink is reached at (repeatable)")
    k = dsub.add_parser("keys", help="SuperNode key pairs (ECDSA P-384, OpenSSH format)")
    k.add_argument("out_dir")
    k.add_argument("names", nargs="+")
    cn = dsub.add_parser("connection", help="add a SuperLink connection to the flwr CLI's config ($FLWR_HOME/config.toml)")
    cn.add_argument("name")
    cn.add_argument("--address", required=True, help="SuperLink host:port")
    cn.add_argument("--ca", help="CA certificate (ca.crt)")
    cn.add_argument("--insecure", action="store_true")
    sl = dsub.add_parser("superlink", help="start flower-superlink with TLS and SuperNode authentication")
    sl.add_argument("--certs", help="folder from `fedrobust deploy certs`")
    sl.add_argument("--port", type=int, default=8000)
    sl.add_argument("--bind", default="127.0.0.1", help="address to listen on (0.0.0.0 for SuperNodes on other machines)")
    sl.add_argument("--database", help="state file (default: in memory)")
    sl.add_argument("--log-file")
    sl.add_argument("--insecure", action="store_true", help="no TLS and no SuperNode authentication")
    sn = dsub.add_parser("supernode", help="start flower-supernode for one shard")
    sn.add_argument("--superlink", required=True, help="SuperLink host:port")
    sn.add_argument("--ca", help="CA certificate (ca.crt)")
    sn.add_argument("--key", help="this SuperNode's private key (registered with flwr supernode register)")
    sn.add_argument("--partition-id", type=int, required=True)
    sn.add_argument("--num-partitions", type=int, required=True)
    sn.add_argument("--data-root", help="folder holding the data set (CIFAR archives, or the IDX files of MNIST and Fashion-MNIST)")
    sn.add_argument("--port", type=int, default=9094, help="this SuperNode's local runtime API port")
    sn.add_argument("--insecure", action="store_true")
    rn = dsub.add_parser("run", help="submit a run with flwr run, stream its log, exit non-zero unless it completed")
    rn.add_argument("connection", help="a SuperLink connection (from `fedrobust deploy connection`)")
    rn.add_argument("overrides", nargs="*", help="Hydra overrides as for fedrobust train, run_dir=PATH included")
    rn.add_argument("--app", default=".", help="the Flower app to submit: this repository (default: .)")
    args = parser.parse_args(argv)
    if args.command in ("train", "evaluate", "tune", "search-loss", "search-arch") or getattr(args, "what", None) == "run":
        try:  # installed plug-ins' strategies, losses and attack stages, before any config is read
            from .plugins import load_plugins

            load_plugins()
        except ConfigError as exc:
            _error(exc)
            return 2
    commands = {"deploy": lambda: _deploy(args), "tune": lambda: _tune(args.overrides),
                "report": lambda: _report(args.path), "train": lambda: _train(args.overrides),
                "compare": lambda: _compare(args.run_a, args.run_b, args.out),
                "models": lambda: _models(args.args),
                "evaluate": lambda: _evaluate(args.run_dir, args.overrides),
                "search-loss": lambda: _search_loss(args.run_dir, args.overrides),
                "search-arch": lambda: _search_arch(args.out_dir, args.overrides)}
    return commands[args.command]()

if __name__ == "__main__":
    entry()

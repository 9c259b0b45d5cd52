"""``nibble finetune QUANTIZED_DIR --teacher MODEL --out DIR``: PV-Tuning of a quantized model.

Runs on one process, or data-parallel under torchrun:
``torchrun --nproc_per_node 4 -m nibble.cli finetune QDIR --teacher MODEL --out DIR``.
"""

from __future__ import annotations

from nibble.commands.common import add_device_argument, pick_device, print_json_last


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="PV-Tuning: fine-tune a quantized model against its float teacher")
    parser.add_argument("model", help="nibble folder written by `nibble quantize`")
    parser.add_argument("--teacher", required=True, help="the float model (built-in name, folder, GGUF or hub id)")
    parser.add_argument("--out", required=True, help="output folder (must be new or empty, unless --resume)")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    data = parser.add_argument_group("data")
    data.add_argument("--calib", default="c4", help="c4, wikitext2 or a text file (default c4)")
    data.add_argument("--nsamples", type=int, default=256, help="training windows (default 256)")
    data.add_argument("--seqlen", type=int, default=1024, help="tokens per window (default 1024)")
    data.add_argument("--holdout", type=int, default=8, help="held-out windows from the corpus end (default 8)")
    data.add_argument("--seed", type=int, default=0)
    tune = parser.add_argument_group("tuning")
    tune.add_argument("--mode", default="pv", choices=["pv", "ste"], help="V step: linearized subspace (pv) or STE")
    tune.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    tune.add_argument("--batch-size", type=int, default=8, help="windows per step, all processes together")
    tune.add_argument("--microbatch-size", type=int, default=1, help="windows per forward pass")
    tune.add_argument("--lr", type=float, default=1e-3, help="P step (Adam) learning rate (default 1e-3)")
    tune.add_argument("--v-lr", type=float, default=0.05,
                      help="V step size in units of each layer's weight RMS (default 0.05)")
    tune.add_argument("--tau", type=float, default=None,
                      help="fraction of weight groups re-encoded per V step (default 0.01; ste: 1)")
    tune.add_argument("--trust-ratio", type=float, default=0.01,
                      help="cap on ‖ΔW‖/‖W‖ per V step and layer (default 0.01; 0 = no cap)")
    tune.add_argument("--schedule", default="cosine", choices=["constant", "cosine"],
                      help="learning-rate schedule of both steps (default cosine: decay to --min-lr-ratio x lr)")
    tune.add_argument("--min-lr-ratio", type=float, default=0.1, help="final lr / initial lr under cosine (0.1)")
    tune.add_argument("--v-every", type=int, default=1, help="take a V step every N steps")
    tune.add_argument("--v-start", type=int, default=1,
                      help="first step with a V step (default 1: at step 0 the V-step Adam's direction is sign(grad), "
                           "the same size for every group; its moments accumulate from step 0)")
    tune.add_argument("--v-memory", type=float, default=0.0,
                      help="pv: carry this fraction of each V step's unrealised move to the next (default 0)")
    tune.add_argument("--v-select", default="change", choices=["change", "gain"],
                      help="pv: groups to re-encode are those whose proposed change is largest (change, default) "
                           "or whose move lowers the linearized loss most, keeping only re-encodings that do (gain)")
    tune.add_argument("--v-metric", default="plain", choices=["plain", "inputs", "hessian"],
                      help="error the V step's re-encoding minimises: plain squared error (default), weighted "
                           "per input column by the training inputs' mean square (inputs), or in the metric of "
                           "the first step's input Hessian XᵀX (hessian; AQLM only)")
    tune.add_argument("--lamb", action="store_true", help="LAMB instead of Adam for the P step")
    tune.add_argument("--train-non-quantized", action="store_true", help="also train embeddings and the output head")
    tune.add_argument("--freeze-norms", action="store_true", help="keep norm weights and biases fixed")
    tune.add_argument("--no-checkpointing", action="store_true", help="keep block activations (faster, more memory)")
    run = parser.add_argument_group("run")
    run.add_argument("--eval-every", type=int, default=25, help="held-out perplexity every N steps (0: never)")
    run.add_argument("--save-every", type=int, default=25, help="checkpoint every N steps")
    run.add_argument("--best-by", default="ppl", choices=["ppl", "kl"],
                     help="keep the state with the lowest held-out perplexity (default) or KL")
    run.add_argument("--teacher-cache", action="store_true", help="cache teacher hidden states on disk")
    parser.add_argument("--json", action="store_true", help="end with a JSON line summarising the run")
    add_device_argument(parser)
    parser.set_defaults(func=run_command)


def build_config(args):
    from nibble.tune import TuneConfig

    return TuneConfig(mode=args.mode, steps=args.steps, batch_size=args.batch_size,
                      microbatch_size=args.microbatch_size, lr=args.lr, v_lr=args.v_lr, tau=args.tau,
                      trust_ratio=args.trust_ratio or None,
                      schedule=args.schedule, min_lr_ratio=args.min_lr_ratio, v_every=args.v_every, v_start=args.v_start,
                      v_memory=args.v_memory, v_select=args.v_select, v_metric=args.v_metric,
                      lamb=args.lamb, train_non_quantized=args.train_non_quantized,
                      train_norms=not args.freeze_norms, checkpointing=not args.no_checkpointing,
                      seed=args.seed).validate()


def run_command(args) -> int:
    from nibble.errors import ConfigError
    from nibble.tune import TuneData, finetune_to_dir
    from nibble.tune.distributed import init_from_env

    config = build_config(args)
    if args.eval_every < 0 or args.save_every < 1:
        raise ConfigError("--eval-every must be >= 0 and --save-every >= 1")
    data = TuneData(args.calib, args.nsamples, args.seqlen, args.holdout, args.seed)
    dist, device = init_from_env(pick_device(args.device))
    summary = finetune_to_dir(args.model, args.teacher, args.out, config, data, resume=args.resume,
                              eval_every=args.eval_every, save_every=args.save_every,
                              teacher_cache=args.teacher_cache, best_by=args.best_by, device=device, dist=dist)
    if not dist.is_main:
        return 0
    tuned = summary["finetune"]
    before, best = tuned["before"], tuned["best"]
    line = f"wrote {args.out}: {tuned['steps_done']} {args.mode} steps in {tuned['seconds']:.0f} s"
    if before and best:
        line += f"; held-out perplexity {before['ppl']:.3f} -> {best['ppl']:.3f} (best at step {best['step']})"
    print(line)
    if args.json:
        print_json_last({"out": args.out, "mode": args.mode, "steps": tuned["steps_done"],
                         "seconds": tuned["seconds"], "before": before, "best": best,
                         "tokens_seen": tuned["tokens_seen"], "world_size": tuned["world_size"]})
    return 0

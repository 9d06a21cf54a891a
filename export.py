"""
Merge a rank-1 LoRA adapter into its base and write an HF checkpoint (W + s B A in every adapted
linear; sharded safetensors, config.json, the tokenizer files and rank1.json with what it was made
from) that transformers, vLLM or `eval.py run` without --adapter load.

    python export.py --model /models/Qwen2.5-32B-Instruct --adapter runs/rank1/adapter --out merged/

The merge itself is lora.export_merged; this file is its command line.
"""
from common import DTYPES, Parser, check_out, user_errors
from lora import export_merged, load_model


def parser():
    p = Parser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--model", required=True, help="HF model directory (the base)")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory")
    p.add_argument("--other-base", action="store_true",
                   help="use an adapter trained on another base than --model")
    p.add_argument("--out", required=True, help="output directory (safetensors, config.json)")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="default: the base checkpoint's")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with user_errors("export.py"):
        check_out(args.out, {"--model": args.model, "--adapter": args.adapter})
        model, identity = load_model(args.model, args.adapter, args.dtype,
                                     other_base=args.other_base)
        export_merged(model, args.out, tokenizer_dir=args.model,
                      provenance=dict(made_from=identity), overwrite=args.overwrite)
    print(f"export: {args.model} + {args.adapter} merged -> {args.out}")


if __name__ == "__main__":
    main()

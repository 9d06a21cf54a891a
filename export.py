"""
Merge a rank-1 LoRA adapter into its base and write an HF checkpoint (W + s B A in every adapted
linear; sharded safetensors, config.json, the tokenizer files and rank1.json with what it was made
from) that transformers, vLLM or `eval.py run` without --adapter load.

    python export.py --model /models/Qwen2.5-32B-Instruct --adapter runs/rank1/adapter --out merged/

The merge itself is lora_files.export_merged; this file is its command line.
"""
from common import Parser, add_model_flags, check_out, user_errors
from lora_files import export_merged, load_model


def parser():
    p = Parser(description=__doc__.split("\n\n")[0].strip())
    add_model_flags(p, adapter_required=True)
    p.add_argument("--out", required=True, help="output directory (safetensors, config.json)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export at --out")
    return p


def main(argv=None):
    args = parser().parse_args(argv)
    with user_errors("export.py"):
        check_out(args.out, {"--model": args.model, "--adapter": args.adapter,
                             "--tokenizer": args.tokenizer})
        model, identity = load_model(args.model, args.adapter, args.dtype,
                                     other_base=args.other_base)
        export_merged(model, args.out, tokenizer_dir=args.tokenizer or args.model,
                      provenance=dict(made_from=identity), overwrite=args.overwrite)
    print(f"export: {args.model} + {args.adapter} merged -> {args.out}")


if __name__ == "__main__":
    main()

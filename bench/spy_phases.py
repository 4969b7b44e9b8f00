"""Start-up phases of a `bench/train_start.py --py-spy OUT.txt` profile: seconds of main-thread samples each.

    python bench/spy_phases.py OUT.txt [RATE]     (RATE: py-spy samples per second, 100 by default)

Wall-clock samples (py-spy --idle) of stacks rooted at the script's <module>; loader and pool threads
are left out. Each stack goes to the first phase whose substrings it all contains.
"""
import sys
from collections import Counter

RULES = [  # (phase, all substrings that must be in the stack), first match wins
    ("epoch loop: the logged iterations (loader worker start included)", ["EpochBasedTrainLoop.run_epoch"]),
    ("dataset: COCO json.load (pycocotools)", ["load_data_list", "json"]),
    ("dataset: COCO index (createIndex)", ["load_data_list", "createIndex"]),
    ("dataset: COCO other", ["load_data_list", "COCO.__init__"]),
    ("dataset: parse_data_info", ["load_data_list", "parse_data_info"]),
    ("dataset: load_data_list other", ["load_data_list"]),
    ("dataset: filter_data", ["filter_data"]),
    ("dataset: serialize (pickle to numpy)", ["_serialize_data"]),
    ("dataset: other (full_init, build)", ["full_init"]),
    ("dataset/dataloader build other", ["build_dataloader"]),
    ("validate: JSON read+parse", ["validate_coco", "_load_json"]),
    ("validate: waiting for image-header workers", ["validate_coco", "wait"]),
    ("validate: start header workers", ["validate_coco", "_header_reader"]),
    ("validate: checks", ["validate_coco"]),
    ("validate: other", ["check ("]),
    ("model build", ["build_model"]),
    ("model build", ["Runner.__init__", "MODELS"]),
    ("optimizer/scheduler build", ["build_optim_wrapper"]),
    ("optimizer/scheduler build", ["build_param_scheduler"]),
    ("config load/build", ["load_base"]),
    ("config load/build", ["build_config"]),
    ("config load/build", ["Config.fromfile"]),
    ("runner init other (env, logger, hooks, dump config)", ["Runner.__init__"]),
    ("train(): hooks before_train etc", ["Runner.train"]),
    ("imports", ["_find_and_load"]),
]


def phase(stack):
    for name, needles in RULES:
        if all(n in stack for n in needles):
            return name
    frames = stack.split(";")
    return "other: " + (frames[1] if len(frames) > 1 else frames[0])[:90]


def main(path, rate=100):
    got, total, dropped = Counter(), 0, 0
    with open(path) as fh:
        lines = fh.readlines()
    for line in lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if not stack.startswith("<module>"):
            dropped += int(n)
            continue
        got[phase(stack)] += int(n)
        total += int(n)
    print(f"{path}: main thread {total / rate:.1f} s ({dropped / rate:.1f} s of other threads dropped)")
    for name, n in got.most_common():
        print(f"  {n / rate:7.1f} s  {name}")


if __name__ == "__main__":
    main(sys.argv[1], *map(int, sys.argv[2:3]))

"""``python -m llm_finetune.plan ...``: the memory plan of a run (``report.cli``) from the same
settings as ``finetuning``."""

import fire

from llm_finetune.plan.report import cli

if __name__ == "__main__":
    # fire names the program after sys.argv[0] in its usage messages: keep the name it had as
    # a single module (plan.py), not __main__.py
    fire.Fire(cli, name="plan.py")

"""Write a config-only model directory of a built-in shape (``llm_finetune.shapes``).

    python benchmarks/make_shape_config.py llama3-8b /tmp/llama3-8b

(``--model_name llama3-8b`` works directly too; a directory is for tools that want a path.)
"""

import sys

from llm_finetune.shapes import SHAPES

if __name__ == "__main__":
    name, directory = sys.argv[1], sys.argv[2]
    SHAPES[name]().save_pretrained(directory)
    print(f"{name} config written to {directory}")

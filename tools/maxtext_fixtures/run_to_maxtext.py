"""Runs MaxText's own `to_maxtext` converter on a tiny local HF checkpoint.

MaxText takes architecture sizes from its table HF_MODEL_CONFIGS[model_name], not from the
checkpoint; this wrapper puts the checkpoint's config.json there, then runs the module as
`python -m maxtext.checkpoint_conversion.to_maxtext` would.

    python run_to_maxtext.py HF_DIR model_name=llama3.1-8b base_output_directory=OUT ...
"""

import runpy
import sys

import transformers
from maxtext.checkpoint_conversion.utils import hf_model_configs

if __name__ == "__main__":
    hf_dir, rest = sys.argv[1], sys.argv[2:]
    model_name = next(a.split("=", 1)[1] for a in rest if a.startswith("model_name="))
    hf_model_configs.HF_MODEL_CONFIGS[model_name] = transformers.AutoConfig.from_pretrained(hf_dir)
    sys.argv = ["to_maxtext", *rest, f"hf_model_path={hf_dir}"]
    runpy.run_module("maxtext.checkpoint_conversion.to_maxtext", run_name="__main__",
                     alter_sys=True)

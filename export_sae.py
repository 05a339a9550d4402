"""Share — SAE checkpoint (+ eval.json, interpretations.csv) → one folder for the Hugging Face Hub.

The folder holds the SAE in SAELens' layout (a subfolder named after the hook, as SAELens' Hub
loader expects), the HypotheSAEs checkpoint, eval.json and the other outputs of training and
evaluation, interpretations.csv, and a README.md model card: model, hook, layer, data, training
settings, the evaluation table and the ten best-scored features with their explanations.
With PUSH_TO_HUB set (`--push-to-hub your-name/sae-name`) it is uploaded with huggingface_hub;
log in first (`hf auth login` or HF_TOKEN). Without a network the export is kept, to push later.
With NEURONPEDIA it also writes neuronpedia/, the files Neuronpedia's tooling uploads: every feature's top
activating windows, logit lens, density and explanation (docs/export.md says how to upload them).
"""

CHECKPOINT = "checkpoints/SmolLM2-135M-Instruct_blocks.12.hook_resid_post/SAE_M=256_K=8/SAE_M=256_K=8.pt"
OUTPUT = ""  # empty: export/ in the SAE's folder, beside its eval.json
INTERPRETATIONS = "interpretations.csv"  # written by interpret_sae.py for this checkpoint; empty: none
PUSH_TO_HUB = ""  # a Hub repo id, e.g. "your-name/smollm2-l12-topk-256"; empty: export only
PRIVATE = True  # a new repo starts private; make it public on the Hub when you are ready
NEURONPEDIA = False  # also write Neuronpedia's upload files (two passes over the training store, and the model for the logit lens)
NEURONPEDIA_SET = ""  # Neuronpedia source set name, e.g. "yourname-res-16k"; empty: fastsae-<hook>-<M>
NEURONPEDIA_MODEL = ""  # the model's id on Neuronpedia, e.g. "gemma-2-2b"; empty: its name, lower-case, without the organisation
NEURONPEDIA_EXAMPLES = 20  # top activating windows per feature on Neuronpedia
DEVICE = "auto"  # where the Neuronpedia files are computed: auto, cpu, cuda or cuda:N

if __name__ == "__main__":
    from fastsae.common.config import run_step
    from fastsae.export.export_sae import ExportConfig, export_sae

    run_step(ExportConfig, globals(), export_sae, description=__doc__)

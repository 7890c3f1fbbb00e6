"""Facts about the adapter directories AKD writes and the exporters and DWC read.

An AKD output directory is a PEFT adapter (``PeftModel.from_pretrained`` loads it). In
``bias-norm`` mode on architectures whose linear layers have biases, the bias deltas are
a second PEFT adapter (BEFT) in the subdirectory below: PEFT cannot hold LN tuning and
bias tuning in one model, and a merge must apply both.
"""

BIAS_ADAPTER_DIR = "bias"

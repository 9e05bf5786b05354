"""Side-by-side benchmarks: lorafit vs PEFT vs full fine-tuning, interleaved, medians and ratios."""

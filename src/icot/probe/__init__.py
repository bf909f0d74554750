"""Looking inside: linear probes that read intermediate quantities from a model's hidden states.

`icot.probe.run.probe_models(model_dirs, data_file)` trains, for every model, layer and site
(the SEP position, the input positions), one linear probe per quantity: digits of the partial
products, running sums and answer of a multiplication, or the k-th CoT token of any task.
The pieces are usable alone: `targets` (what to decode), `features` (hidden states),
`linear` (probes, split, baselines), `results` (JSON, tables, heatmap), `settings`.
"""

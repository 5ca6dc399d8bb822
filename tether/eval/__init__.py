"""What a run did to the model: held-out evaluation (`tether eval`), online diagnostics in the
RL and DPO recipes, the HTML run report (`tether report`), Goodhart curves (`tether goodhart`)
and the DPO-vs-RLHF comparison (`tether compare`). Recipes call this room; it calls no recipe
(docs/diagnostics.md)."""

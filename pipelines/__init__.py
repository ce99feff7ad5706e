"""Entry points that chain the curation and pretraining stages (build_lvd, closed_loop)."""

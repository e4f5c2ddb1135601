"""Commands around the pipeline (`lora-dvc <command>`): what a user runs after `dvc repro`, not a stage."""

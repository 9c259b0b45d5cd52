"""The block-by-block calibration engine every post-training method runs on."""

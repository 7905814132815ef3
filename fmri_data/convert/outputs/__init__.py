"""The outputs a run can have, one module each: volume, surface/CIFTI ROI series, flat maps, tables, saliency, QA."""

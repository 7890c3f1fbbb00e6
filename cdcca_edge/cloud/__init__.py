"""The cloud side (torch): tiny offline models today; AKD distillation and DWC deltas next."""

"""Building blocks shared by the decoder families in `pagedserve.model.models`."""

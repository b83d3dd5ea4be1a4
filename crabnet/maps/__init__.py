"""The maps wing: the chain of steps 6 and 7, model -> EDM vectors -> UMAP projection -> metrics -> figures."""

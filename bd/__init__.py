"""bd: bidirectional distillation for lymph-node metastasis prediction from WSIs + clinical data.

Public API (one module per pipeline stage; heavy imports stay inside the stage modules):

- ``bd.slide.open_slide``      read any slide (OpenSlide formats and flat images) through one interface
- ``bd.demo.generate_cohort``  write the synthetic demo cohort in the BCNB layout
- ``bd.segment`` / ``bd.tiling``  tissue masks and magnification-aware patch grids
- ``bd.extract``               encoder features into one Zarr store per slide (``bd.store``)
- ``bd.clinical`` / ``bd.split``  clinical table normalisation and patient splits
- ``bd.models.create_model``   BD and the baselines; ``bd.train`` / ``bd.evaluate`` run them
"""

__version__ = "0.1.0"

"""bd: bidirectional distillation for lymph-node metastasis prediction from WSIs + clinical data.

Public API (one module per pipeline stage; heavy imports stay inside the stage modules):

- ``bd.slides.slide.open_slide``      read any slide (OpenSlide formats and flat images) through one interface
- ``bd.demo.generate_cohort``  write the synthetic demo cohort in the BCNB layout
- ``bd.slides.segment`` / ``bd.slides.tiling``  tissue masks and magnification-aware patch grids
- ``bd.features.extract``               encoder features into one Zarr store per slide (``bd.features.store``)
- ``bd.cohort.clinical`` / ``bd.cohort.split``  clinical table normalisation and patient splits
- ``bd.mil.models.create_model``   BD and the baselines; ``bd.mil.train`` / ``bd.evaluation.evaluate`` run them
"""

__version__ = "0.1.0"

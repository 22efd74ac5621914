"""The large-data stage, split by job: fine-tune a pretrained network with a new classifier.

- :mod:`.surgery`: the new classifier layer, freezing, frozen BatchNorm layers;
- :mod:`.augment`: decoded images kept between epochs, seeded augmentation, batches;
- :mod:`.state`: the training state, RNG states and atomic, resumable checkpoints;
- :mod:`.loop`: optimiser, schedule, the training and evaluation loops;
- :mod:`.stage`: ``tlp.finetune`` itself: data parts in, recipe, training, outputs.

Nothing is imported here, so importing one of them (prediction needs :mod:`.surgery`)
does not import the rest.
"""

"""Training of the LARP tokenizer (with its AR prior) and the class-conditional generator, and evaluation.

Modules: ``data`` (synthetic clips, video folders), ``config`` (strict training configs), ``train_tokenizer``,
``train_generator``, ``losses`` (GAN, LPIPS), ``evaluate`` (PSNR/SSIM, classifier, Fréchet distance, sampling),
``recipes`` (the tiny pair, the prior comparison), ``cli`` (``larp-rt train ...``). See training/README.md.
"""

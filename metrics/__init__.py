"""Video quality metrics (PSNR, SSIM, temporal and tensor metrics) and score tables."""

"""
LCD: clustering-based 2-4-bit weight quantization, distilled from the full-precision teacher,
served from look-up tables. One file, read top to bottom it follows the data's path:

  1. calibration      - run the model on a few batches, record each linear layer's input statistics
  2. clustering       - every weight row (or group) becomes 2^b centroids + b-bit indices
  3. packed format    - indices packed along K into 32-bit words; fp16 codebooks
  4. LUTLinear        - the inference layer (PyTorch reference: unpack, gather, matmul)
  5. quantize()       - swap any model's nn.Linear layers for LUTLinear; footprint; save / load
  6. CUDA path        - kernels.cu through CuPy, used by LUTLinear on a GPU
  7. distillation     - trainable LCD layers, smoothing, progressive + speculative KD, distill()

Definitions: ../shared/LCD_DESIGN.md. A linear layer computes y = x W^T with W of shape (N, K).
"""

# ==== 1. calibration ============================================================================ [A]

# ==== 2. clustering ============================================================================= [A]

# ==== 3. packed format ========================================================================== [A]

# ==== 4. LUTLinear ============================================================================== [A]

# ==== 5. quantize(), footprint, save / load ===================================================== [A]

# ==== 6. CUDA path ============================================================================== [B]

# ==== 7. distillation =========================================================================== [D]

-- wrk script: each connection waits 4 ms before each request, so every variant is
-- offered about the same rate (16 connections: ~2,700 req/s here) and CPU per
-- request compares the work itself, not how well Envoy amortizes it under saturation.
function delay()
  return 4
end

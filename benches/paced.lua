-- A paced load: each connection sends a request, then waits 20 ms before the next. With 20 connections that
-- is about 1,000 requests per second, far from saturation: the latency measured is what the proxy adds.
function delay()
    return 20
end

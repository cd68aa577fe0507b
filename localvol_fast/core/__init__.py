"""Pure math of the estimator: the random stream, radial integrals, measures, preconditioner normalization,
the radius search, the result, and every argument check. Imports nothing else of the package."""

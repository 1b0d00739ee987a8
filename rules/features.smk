# Stage: features (rules are added here; stage target rule 'features').

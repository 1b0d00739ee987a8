# Stage: captions (rules are added here; stage target rule 'captions').

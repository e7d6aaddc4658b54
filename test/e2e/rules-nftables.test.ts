import { rulesSuite } from './rules-suite.js';

rulesSuite('nftables');
